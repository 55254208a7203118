"""The `distill train` and `distill export` subcommands.

`distill train` runs the trainer in this process, as one rank of whatever launched it: plain (a world
of one), `torchrun --nproc-per-node N`, the `deepspeed` launcher or `srun`; `launchers/train_student.py`
is the same entry point as a script. Its exit status is 0 when the run finished, 75 when it saved a
checkpoint because it was asked to stop (requeue it), 2 for bad input. `distill export` turns a
checkpoint into a Hugging Face folder in one process. Heavy imports stay inside the handlers.
"""
from __future__ import annotations

import argparse

TRAIN_HELP = """\
Train the student: DeepSpeed ZeRO-3 over the data-parallel ranks, tensor parallelism within a model
replica (parallel.tp), the loss of the `loss` section against the teacher cache in data.teacher_cache
(or plain next-token training without one). See configs/student_*.yaml.

  distill train --config configs/student_kd.yaml run_dir=runs/kd data.tokens=D data.teacher_cache=C
  torchrun --nproc-per-node 4 launchers/train_student.py --config C parallel.tp=2

Writes into run_dir: checkpoints/ (latest = newest complete), tensorboard/, metrics.jsonl,
config.yaml, deepspeed.json. The same command again resumes from checkpoints/latest. SIGUSR1 or
SIGTERM: the ranks agree at the next step, save, and exit with status 75 (requeue).
"""

EXPORT_HELP = """\
Write a training checkpoint as a Hugging Face folder (config.json, safetensors, the tokenizer when
the run named one) that transformers loads with from_pretrained. One process, any layout the
checkpoint was saved with. --checkpoint takes a run folder, its checkpoints folder (both mean the
latest checkpoint) or one checkpoint folder (checkpoints/step_NNNNNNNN).
"""


def add_train_commands(commands) -> None:
    """Register `train` and `export` on the `distill` subparsers."""
    train = commands.add_parser("train", help="train the student (DeepSpeed ZeRO-3), resumable",
                                description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", metavar="PATH", help="YAML config (a TrainConfig; see configs/student_*.yaml)")
    train.add_argument("overrides", nargs="*", metavar="section.key=value", help="override a setting (YAML value)")
    train.set_defaults(handler=run_train_command)
    export = commands.add_parser("export", help="write a training checkpoint as a Hugging Face folder",
                                 description=EXPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--checkpoint", metavar="DIR", required=True,
                        help="run folder, checkpoints folder or checkpoint folder")
    export.add_argument("--out", metavar="DIR", required=True, help="new folder for the Hugging Face model")
    export.add_argument("--force", action="store_true", help="replace a non-empty --out")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    export.set_defaults(handler=run_export_command)


def run_train_command(args: argparse.Namespace) -> int:
    from pipeline.config import TrainConfig, load_config
    from pipeline.train.run import run_training

    return run_training(load_config(TrainConfig, args.config, args.overrides))


def run_export_command(args: argparse.Namespace) -> int:
    from pipeline.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, overwrite=args.force, progress=not args.quiet)
    print(f"exported {args.checkpoint} to {out}")
    return 0

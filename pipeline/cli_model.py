"""The `distill convert` and `distill inspect` subcommands: checkpoints between Hugging Face and TP layouts.

Both run in one process without torch.distributed (conversion is a pure re-slicing, see
pipeline/model/layout.py), so they work on a login node. Heavy imports stay inside the handlers so
that `distill --help` answers at once.
"""
from __future__ import annotations

import argparse
import sys

CONVERT_HELP = """\
Convert a checkpoint between a Hugging Face folder and the pre-split TP checkpoint format.

  hf-to-tp  SRC DST --tp N     split a Hugging Face folder (Llama, Qwen2, Mistral) into one
                               safetensors file per TP rank, so each rank of a job with tp=N
                               reads only its own file
  tp-to-hf  SRC DST            join a TP checkpoint back into a Hugging Face folder that
                               transformers' from_pretrained loads

A job can also load a Hugging Face folder directly (each rank then reads its slices of the
shared files); converting pays off when the same layout starts many times. Outputs appear
atomically: a crash leaves DST.partial, never a half-written DST.
"""


def add_model_commands(commands) -> None:
    """Register `convert` and `inspect` on the `distill` subparsers."""
    convert = commands.add_parser("convert", help="convert checkpoints: Hugging Face <-> TP checkpoint",
                                  description=CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("direction", choices=("hf-to-tp", "tp-to-hf"), help="which way to convert")
    convert.add_argument("source", metavar="SRC", help="checkpoint folder to read")
    convert.add_argument("dest", metavar="DST", help="folder to write (must not exist or be empty)")
    convert.add_argument("--tp", type=int, metavar="N", help="hf-to-tp: tensor-parallel size to split for")
    convert.add_argument("--vocab-multiple", type=int, default=128, metavar="M",
                         help="hf-to-tp: pad the vocabulary to a multiple of M × tp (default 128; must match "
                              "compute.vocab_multiple of the job that loads it)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                         help="hf-to-tp: store in this dtype (default: as in the source)")
    convert.add_argument("--tokenizer", metavar="PATH",
                         help="tp-to-hf: tokenizer.json or tokenizer folder to put next to the weights")
    convert.add_argument("--force", action="store_true", help="replace DST if it exists")
    convert.set_defaults(handler=_convert, parser=convert)
    inspect = commands.add_parser(
        "inspect", help="describe a checkpoint: architecture, parameters, layout, vocabulary",
        description="Describe a Hugging Face or TP checkpoint folder from its config and file headers (no "
                    "weight is read): architecture, parameter count, heads and layers, rotary settings, "
                    "vocabulary and its padding per TP size, the TP sizes it splits over, and the tokenizer "
                    "in the folder if any.")
    inspect.add_argument("path", metavar="DIR", help="checkpoint folder")
    inspect.set_defaults(handler=_inspect)


def _convert(args: argparse.Namespace) -> int:
    import torch

    from pipeline.model.tp_checkpoint import hf_to_tp_checkpoint, tp_checkpoint_to_hf

    if args.direction == "hf-to-tp":
        if args.tp is None or args.tp < 1:
            args.parser.error("hf-to-tp needs --tp N (N ≥ 1)")
        if args.tokenizer:
            args.parser.error("--tokenizer applies to tp-to-hf only")
        dtype = getattr(torch, args.dtype) if args.dtype else None
        out = hf_to_tp_checkpoint(args.source, args.dest, args.tp, vocab_multiple=args.vocab_multiple, dtype=dtype,
                                  overwrite=args.force, progress=_progress)
    else:
        if args.tp is not None or args.dtype:
            args.parser.error("--tp and --dtype apply to hf-to-tp only")
        out = tp_checkpoint_to_hf(args.source, args.dest, tokenizer=args.tokenizer, overwrite=args.force)
    print(f"wrote {out}")
    return 0


def _progress(done: int, total: int) -> None:
    print(f"  rank file {done}/{total} written", file=sys.stderr, flush=True)


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.model.inspect import describe

    print(describe(args.path), end="")
    return 0

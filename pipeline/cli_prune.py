"""The `distill prune` subcommand: a smaller student cut out of its teacher by measured importance (Minitron-style).

It runs as a world of one at TP 1, or under torchrun as a world of exactly `--tp` processes holding the
teacher at that TP (rank 0 writes the folder and prints the summary). Heavy imports
stay inside the handler, so `--help` answers at once; bad targets are PruneErrors (exit 2) naming the flag.
"""
from __future__ import annotations

import argparse

PRUNE_HELP = """\
Write a smaller Hugging Face model cut out of a teacher (Hugging Face folder or TP checkpoint), ranking
what to keep on calibration tokens (the first --samples samples of --tokens):

  depth   --num-layers K: --depth fixed keeps evenly spaced layers (0, 2, 4, … at half depth, as
          f-DISTILL's students); --depth importance drops the layers whose skipping changes the
          teacher's next-token distribution least (mean KL(full ‖ skipped); one more pass per layer)
  width   --intermediate-size: MLP channels by mean |silu(gate)·up|; --num-heads: query heads by whole
          key/value groups (mean norm of the heads' attention outputs), kv heads shrink in proportion;
          --hidden-size: residual channels by mean |hidden| over the layers, cut from every tensor
          (head_dim stays the teacher's, heads are removed whole; --hidden-size must be a multiple of them)
  --params N instead of --num-layers/--intermediate-size: drop layers (down to half) then narrow the MLP
          until the model has at most N parameters

At --tp N (under torchrun --nproc-per-node N; world = N, no data parallelism) each rank holds its TP
slices of the teacher and calibrates them; rank 0 writes the folder. The result equals --tp 1's up to float
rounding. A TP checkpoint is read as it is split at its own TP, or joined first at --tp 1.

Kept indices stay in the teacher's order: targets equal to the teacher's sizes copy it bit for bit. The
folder gets prune_report.json (kept layers/heads/channels, scores, the teacher's and the pruned model's
loss on the calibration tokens before any training); the tokenizer is copied when the teacher has one.

  distill prune --teacher work/teacher_hf --tokens work/shards/train --samples 64 --num-layers 6 --out work/pruned
  distill prune --teacher T --tokens D --depth importance --num-layers 8 --intermediate-size 1024 \\
      --num-heads 8 --hidden-size 512 --out work/pruned
  distill prune --teacher T --tokens D --params 60000000 --out work/pruned
  torchrun --nproc-per-node 4 -m pipeline prune --tp 4 --teacher work/teacher_tp4 --tokens D --num-layers 16 \\
      --out work/pruned
"""


def add_prune_command(commands) -> None:
    """Register `prune` on the `distill` subparsers."""
    parser = commands.add_parser("prune", help="a smaller student cut out of its teacher (depth and width pruning)",
                                 description=PRUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, metavar="PATH", help="Hugging Face folder or TP checkpoint")
    parser.add_argument("--tokens", required=True, metavar="DIR", help="calibration token shards")
    parser.add_argument("--samples", type=int, default=64, metavar="N",
                        help="calibrate on the first N samples of --tokens (default 64)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the pruned Hugging Face folder to write")
    parser.add_argument("--num-layers", type=int, metavar="K", help="layers to keep (default: all)")
    parser.add_argument("--hidden-size", type=int, metavar="H", help="residual channels to keep (default: all)")
    parser.add_argument("--intermediate-size", type=int, metavar="F", help="MLP channels to keep (default: all)")
    parser.add_argument("--num-heads", type=int, metavar="N",
                        help="query heads to keep, a multiple of the teacher's heads per kv head (default: all)")
    parser.add_argument("--params", type=int, metavar="N", help="at most N parameters: fewer layers, then MLP width")
    parser.add_argument("--depth", choices=("fixed", "importance"), default="fixed",
                        help="how layers are chosen (default fixed: evenly spaced)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="calibration samples per forward")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="seeds torch (default 0); nothing in pruning is random, ties go to the lower index")
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="tensor-parallel size of the teacher; the world must be N processes (default 1)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    parser.set_defaults(handler=run_prune_command)


def run_prune_command(args: argparse.Namespace) -> int:
    from pipeline.prune.run import REPORT, prune, summary

    report = prune(teacher=args.teacher, tokens=args.tokens, out=args.out, samples=args.samples,
                   num_layers=args.num_layers, hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                   num_heads=args.num_heads, params=args.params, depth=args.depth, batch_size=args.batch_size,
                   seed=args.seed, overwrite=args.force, tp=args.tp, progress=True)
    if _rank() == 0:
        print(summary(report))
        print(f"wrote {args.out} (report: {args.out}/{REPORT})")
    return 0


def _rank() -> int:
    from pipeline.parallel import read_launch_env

    return read_launch_env().rank

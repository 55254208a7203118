"""The `distill cache` and `distill verify-cache` subcommands.

`distill cache` runs the job in this process, as one rank of whatever launched it: plain (a world of
one), `torchrun --nproc-per-node N` or `srun`; `launchers/cache_teacher.py` is the same entry point as a
script. `distill verify-cache` checks a finished cache against its token shards and, with the teacher,
recomputes a sample of positions. Heavy imports stay inside the handlers so `--help` answers at once.
"""
from __future__ import annotations

import argparse
import json
import os

from pipeline.job_array import ARRAY, array_slice, parse_range

CACHE_HELP = """\
Run the teacher over every token shard and write one cache shard per token shard, with the same
keys: per position, the top-K ids with their log-probs and the exact rest mass (targets.mode topk)
or N sampled draws as ids and counts (targets.mode sampled). See configs/cache_topk.yaml.

One process per rank: world = dp × tp, where parallel.tp ranks hold one teacher replica and the
replicas split the shards. On one machine:
  distill cache --config configs/cache_topk.yaml teacher=T tokens=D output=O
  torchrun --nproc-per-node 4 launchers/cache_teacher.py --config C parallel.tp=2
Rerun the same command after a crash or preemption: finished shards are kept, the rest are made.

Teacher-sampled prefixes (f-DISTILL's KL, SeqKD): prefixes.source=teacher takes each token sample's
first prefixes.prompt_len tokens as a prompt, lets the teacher continue it (prefixes.sampling; top-k 30
at temperature 1 by default) and writes in one pass both the generated token shards, with a loss mask
(generated positions by default), to `generated` (default OUTPUT/generated) and the targets along them
to OUTPUT. See configs/cache_teacher_sampled.yaml; train on them with
  distill train ... data.tokens=OUTPUT/generated data.teacher_cache=OUTPUT
"""

VERIFY_HELP = """\
Check a cache folder: its manifest, every shard's sha256 and sample count, keys aligned with the
token shards, the tokenizer and the source shards' sha256. With --teacher, recompute the teacher on
a sample of positions and report the largest log-prob error and the KL divergence between the full
teacher distribution and the decoded sparse one (top-K plus rest), or for sampled targets how many
positions' draws reproduce exactly. Exit status 1 when a problem is found.
"""


def add_cache_commands(commands) -> None:
    """Register `cache` and `verify-cache` on the `distill` subparsers."""
    cache = commands.add_parser("cache", help="write the teacher's sparse targets for every token shard",
                                description=CACHE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache.add_argument("--config", metavar="PATH", help="YAML config (a CacheConfig; see configs/cache_*.yaml)")
    cache.add_argument("--shards", metavar="START:STOP|array", type=parse_range,
                       help="only token shards START ≤ i < STOP, or 'array': this Slurm array task's share of "
                            "them; the manifest is written by whichever run finds every shard done")
    cache.add_argument("overrides", nargs="*", metavar="section.key=value", help="override a setting (YAML value)")
    cache.set_defaults(handler=run_cache_command)
    verify = commands.add_parser("verify-cache", help="check a teacher cache against its token shards",
                                 description=VERIFY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("folder", metavar="DIR", help="cache folder")
    verify.add_argument("--tokens", metavar="DIR", required=True, help="the token-shard folder it was made from")
    verify.add_argument("--teacher", metavar="PATH", help="recompute positions with this teacher (one process)")
    verify.add_argument("--positions", type=int, default=256, metavar="N",
                        help="positions to recompute with --teacher (default 256, spread over the shards)")
    verify.set_defaults(handler=verify_cache_command)


def run_cache_command(args: argparse.Namespace) -> int:
    from pipeline.config import COMMAND_LINE, CacheConfig, ConfigError, load_config
    from pipeline.teacher.job import require_paths, run_cache

    cfg = load_config(CacheConfig, args.config, args.overrides)
    shards = args.shards
    if shards == ARRAY:
        from pipeline.data.sources import ShardSet

        require_paths(cfg)
        count = len(ShardSet(cfg.tokens).manifest.shards)
        try:
            shards = array_slice(count)
        except ValueError as err:
            raise ConfigError("--shards", str(err), COMMAND_LINE) from None
        if shards[0] == shards[1]:
            print(f"array task {os.environ['SLURM_ARRAY_TASK_ID']}: no shard of the {count} falls to this task")
            return 0
    summary = run_cache(cfg, shard_range=shards)
    if cfg.progress and summary is not None:
        print(format_summary(summary))
    return 0


def format_summary(summary: dict) -> str:
    state = "complete" if summary["complete"] else "incomplete (other shards still missing)"
    return (f"cache {summary['output']}: {state}; wrote {summary['shards_written']} of {summary['shards_total']} "
            f"shards ({summary['shards_todo']} were missing), {summary['tokens']:,} tokens in "
            f"{summary['seconds']:.1f} s = {summary['tokens_per_s']:,.0f} tokens/s, "
            f"{summary['bytes_per_token']:.2f} bytes/token" + _generated_line(summary))


def _generated_line(summary: dict) -> str:
    if "generated_tokens" not in summary:
        return ""
    return (f"; the teacher generated {summary['generated_tokens']:,} tokens "
            f"({summary['generated_tokens_per_s']:,.0f} tokens/s over the job) into {summary['generated']}")


def verify_cache_command(args: argparse.Namespace) -> int:
    from pipeline.teacher.verify import verify_cache

    report = verify_cache(args.folder, args.tokens, teacher=args.teacher, positions=args.positions)
    for problem in report["problems"]:
        print(problem)
    print(json.dumps({k: v for k, v in report.items() if k != "problems"}, indent=1))
    return 1 if report["problems"] else 0

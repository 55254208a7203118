"""The `distill` command: parse the command line, load and validate the config, hand over to a stage.

Design choice: the CLI stays thin. Each subcommand is one small handler that resolves a config
(YAML file plus `section.key=value` overrides) and passes the typed config to the code that does the
work, so everything a run does is visible in its resolved config and nothing hides in flags. This
module imports nothing heavy (no torch), so `distill --help` and config errors come back at once;
the cost is that stages import their own dependencies inside their handlers.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pipeline.config import ConfigError, RunConfig, config_reference, dump_yaml, load_config

DESCRIPTION = """\
Knowledge distillation during LLM pretraining: a student learns from a teacher's next-token
distributions while it is pretrained.

The pipeline runs as stages, each a command on one machine (torchrun) or on a cluster (slurm/):
  tokenize   raw text into token shards
  cache      a tensor-parallel teacher writes sparse next-token targets for every token shard
  train      the student learns from token shards and the teacher cache (DeepSpeed ZeRO-3, optional TP)
  eval       perplexity and agreement with the teacher on held-out shards
  export     the student as a Hugging Face checkpoint
These stages arrive in later versions. Every stage reads a YAML config that overrides can change on
the command line (section.key=value); `distill config` shows the resolved result.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `distill` and its subcommands."""
    parser = argparse.ArgumentParser(prog="distill", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config = commands.add_parser(
        "config", help="check a config and print it resolved",
        description="Load a YAML config, apply section.key=value overrides, check every key, type and range, "
                    "and print the resolved config as YAML (or, with --reference, the reference of every key).")
    source = config.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="PATH", help="YAML config file (default: all defaults)")
    source.add_argument("--reference", action="store_true",
                        help="print the Markdown reference of every config key instead")
    config.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override a setting; the value is read as YAML (2, 2.0, true, null, js)")
    config.set_defaults(handler=_show_config, parser=config)
    return parser


def _show_config(args: argparse.Namespace) -> None:
    if args.reference:
        if args.overrides:
            args.parser.error("--reference takes no overrides")
        print(config_reference(RunConfig), end="")
        return
    print(dump_yaml(load_config(RunConfig, args.config, args.overrides)), end="")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `distill` and `python -m pipeline`; returns the exit status (2 for a bad config)."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except ConfigError as err:
        print(f"distill: error: {err}", file=sys.stderr)
        return 2
    return 0

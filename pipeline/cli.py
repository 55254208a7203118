"""The `distill` command: parse the command line, load and validate the config, hand over to a stage.

Design choice: the CLI stays thin. Each subcommand is one small handler that resolves a config
(YAML file plus `section.key=value` overrides) and passes the typed config to the code that does the
work, so everything a run does is visible in its resolved config and nothing hides in flags. Importing
this module imports no torch, DeepSpeed, megatron or transformers (tests/unit/test_cli.py checks it), so
`distill --help` and config errors come back in a fraction of a second; the cost is that stages import
their own dependencies inside their handlers, and modules the CLI reaches (the quickstart's report, the
monitor) import torch inside the functions that need it.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from pathlib import Path
from typing import Sequence

from pipeline.cli_cache import add_cache_commands
from pipeline.cli_eval import add_eval_command
from pipeline.cli_generate import GenerateError, add_generate_command
from pipeline.cli_model import add_model_commands
from pipeline.cli_prune import add_prune_command
from pipeline.cli_quickstart import add_quickstart_command
from pipeline.cli_train import add_train_commands
from pipeline.config import CacheConfig, ConfigError, RunConfig, TrainConfig, config_reference, dump_yaml, load_config
from pipeline.job_array import ARRAY, array_slice, parse_range
from pipeline.quickstart.settings import QuickstartConfig

CONFIG_KINDS = {"train": TrainConfig, "cache": CacheConfig, "loss": RunConfig, "quickstart": QuickstartConfig}
KIND_BY_PREFIX = {"student_": TrainConfig, "cache_": CacheConfig, "quickstart": QuickstartConfig}

DESCRIPTION = """\
Knowledge distillation during LLM pretraining: a student learns from a teacher's next-token
distributions while it is pretrained.

The pipeline runs as stages, each a command on one machine (torchrun) or on a cluster (slurm/):
  tokenize   raw text into token shards
  cache      a tensor-parallel teacher writes sparse next-token targets for every token shard
  train      the student learns from token shards and the teacher cache (DeepSpeed ZeRO-3, optional TP),
             evaluated on held-out shards as it goes
  eval       f-DISTILL's likelihood and coverage risks of a student against a teacher (also in train's eval)
  export     the student as a Hugging Face checkpoint
  convert    checkpoints between Hugging Face folders and pre-split tensor-parallel files
  inspect    what a checkpoint holds: architecture, parameters, vocabulary, TP sizes it splits over
  generate   sample continuations of prompts (a text file or token shards) from any checkpoint
  prune      a smaller student cut out of its teacher (layers, MLP channels, heads, hidden channels)
  quickstart all of the above on the shipped Austen corpus, on CPU: one student per loss, compared
Checks: verify-shards (token shards), verify-cache (a teacher cache). Every stage reads a YAML
config that overrides can change on the command line (section.key=value); `distill config` shows
the resolved result.
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
    config.add_argument("--kind", choices=sorted(CONFIG_KINDS), default=None,
                        help="which config: train (distill train), cache (distill cache) or loss (the loss "
                             "sections alone); default: from the file name (student_*, cache_*), else loss")
    config.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override a setting; the value is read as YAML (2, 2.0, true, null, js)")
    config.set_defaults(handler=_show_config, parser=config)
    _add_tokenize(commands)
    verify = commands.add_parser(
        "verify-shards", help="check a token-shard folder against its manifest",
        description="Check every shard of a token-shard folder against manifest.json: presence, unlisted shards, "
                    "sample and token counts, sha256, decodable samples, duplicate keys, truncated tars. Prints "
                    "each problem naming its file and exits 1 if there is any, else prints a summary and exits 0.")
    verify.add_argument("folder", metavar="DIR", help="folder holding manifest.json and the .tar.gz shards")
    verify.set_defaults(handler=_verify_shards)
    add_model_commands(commands)
    add_cache_commands(commands)
    add_train_commands(commands)
    add_eval_command(commands)
    add_generate_command(commands)
    add_prune_command(commands)
    add_quickstart_command(commands)
    return parser


def _add_tokenize(commands) -> None:
    from tokenization.readers import DEFAULT_SPLIT_BYTES  # standard library only: --help stays fast

    tokenize = commands.add_parser("tokenize", help="turn raw text into token shards, or fit a BPE tokenizer",
                                   description="Train a byte-level BPE tokenizer, or tokenize and pack raw text "
                                               "into webdataset token shards with a manifest.")
    steps = tokenize.add_subparsers(dest="step", required=True, metavar="STEP")
    train = steps.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer and save tokenizer.json",
                             description="Train a byte-level BPE tokenizer (Hugging Face tokenizers) on the "
                                         "documents of the input files and save it as one tokenizer.json.")
    _add_input_options(train)
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="vocabulary size, special tokens included (≥ 256 + their number)")
    train.add_argument("--special-token", action="append", metavar="TOKEN", dest="special_tokens",
                       help="a special token (repeatable; default: <|endoftext|>, the end-of-document token)")
    train.add_argument("--out", required=True, metavar="PATH", help="where to write tokenizer.json")
    train.set_defaults(handler=_train_tokenizer)
    shard = steps.add_parser(
        "shard", help="tokenize and pack text into token shards",
        description="Tokenize the documents of the input files, pack them into windows of seq_len + 1 tokens "
                    "and write gzip-compressed webdataset shards (.tar.gz) plus manifest.json. The input is cut into parts (a file, or a "
                    "--split-bytes range of a large plain .jsonl) processed in parallel, one per worker; the "
                    "output does not depend on the worker count, and rerunning the same command after a crash "
                    "finishes only the unfinished parts and yields the same shards and manifest as an "
                    "uninterrupted run. An input without text is an error.")
    _add_input_options(shard)
    shard.add_argument("--tokenizer", required=True, metavar="PATH",
                       help="a tokenizer.json file or a Hugging Face tokenizer folder holding one")
    shard.add_argument("--out", required=True, metavar="DIR", help="output folder for shards and manifest.json")
    shard.add_argument("--seq-len", type=int, required=True, metavar="N",
                       help="sequence length; each sample stores N + 1 token ids")
    shard.add_argument("--packing", choices=("concat", "bestfit"), default="concat",
                       help="concat: documents joined with EOS and cut into windows, each part's tail dropped; "
                            "bestfit: best-fit decreasing, documents split only when longer than a window, "
                            "windows padded with EOS (default: concat)")
    shard.add_argument("--eos-token", default="<|endoftext|>", metavar="TOKEN",
                       help="token appended to every document (default: <|endoftext|>)")
    shard.add_argument("--workers", type=int, default=1, metavar="N",
                       help="processes working on parts in parallel (default: 1)")
    shard.add_argument("--split-bytes", type=int, default=DEFAULT_SPLIT_BYTES, metavar="BYTES",
                       help="cut a plain .jsonl file larger than this into parts of this many bytes, each owning "
                            "the lines that start in it, so workers and array tasks share one large file; "
                            ".txt, .jsonl.gz, .jsonl.zst and .parquet files are one part each (a compressed "
                            "stream cannot be entered in the middle); 0: one part per file. Part of the "
                            "settings: a rerun in the same folder must use the same value "
                            f"(default: {DEFAULT_SPLIT_BYTES} = 256 MiB)")
    shard.add_argument("--shard-max-bytes", type=int, default=1 << 30, metavar="BYTES",
                       help="start a new shard once one holds this many bytes on disk, compressed (default: 1 GiB)")
    shard.add_argument("--shard-max-samples", type=int, default=100_000, metavar="N",
                       help="start a new shard once one holds this many samples (default: 100000)")
    shard.add_argument("--files", metavar="START:STOP|array", type=parse_range,
                       help="only the parts START ≤ i < STOP (the sorted, expanded input files, each large plain "
                            ".jsonl counted as its --split-bytes parts; with no file split, part i is file i), or "
                            "'array': this Slurm array task's share of them; tasks may share --out. STOP is "
                            "clipped to the part count, an empty range does nothing; the manifest is written by "
                            "whichever run finds every part done")
    shard.add_argument("--no-progress", action="store_true", help="no progress bar")
    shard.set_defaults(handler=_shard)


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                        help="input files or globs (sorted): .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet")
    parser.add_argument("--text-field", default="text", metavar="NAME",
                        help="JSON field or parquet column holding the text (default: text)")
    parser.add_argument("--txt-mode", choices=("file", "blocks"), default="file",
                        help="a .txt file is one document (file) or one per blank-line-separated block "
                             "(blocks) (default: file)")


def _train_tokenizer(args: argparse.Namespace) -> None:
    from tokenization.readers import expand_inputs
    from tokenization.tokenizer import DEFAULT_EOS, train_tokenizer

    tok = train_tokenizer(expand_inputs(args.input), args.vocab_size, tuple(args.special_tokens or (DEFAULT_EOS,)),
                          args.out, text_field=args.text_field, txt_mode=args.txt_mode)
    print(f"wrote {args.out} ({tok.get_vocab_size()} tokens)")


def _shard(args: argparse.Namespace) -> None:
    from tokenization.errors import TokenizationError
    from tokenization.shards import corpus_parts, missing_parts, shard_corpus

    count = len(corpus_parts(args.input, args.split_bytes)[2])
    parts = args.files
    if parts == ARRAY:
        try:
            parts = array_slice(count)
        except ValueError as err:
            raise TokenizationError(f"--files: {err}") from None
    # the manifest records the command without --files: it describes the whole folder, whichever job array
    # task writes it, so a range-by-range folder is byte-identical to one made by a single run
    manifest = shard_corpus(args.input, args.tokenizer, args.out, seq_len=args.seq_len, packing=args.packing,
                            text_field=args.text_field, txt_mode=args.txt_mode, eos_token=args.eos_token,
                            workers=args.workers, shard_max_bytes=args.shard_max_bytes,
                            shard_max_samples=args.shard_max_samples, split_bytes=args.split_bytes,
                            command=shlex.join(["distill", *_without_option(args.argv, "--files")]),
                            progress=not args.no_progress, part_range=parts)
    if manifest is not None:
        print(f"wrote {len(manifest.shards)} shards, {manifest.total_samples} samples, "
              f"{manifest.total_tokens} tokens to {args.out}")
        return
    start, stop = parts[0], min(parts[1], count)
    if stop > start:
        done = f"tokenized part{'s' if stop - start > 1 else ''} {start}{f'-{stop - 1}' if stop - start > 1 else ''} " \
               f"of {count}"
    else:
        done = f"no parts in range {parts[0]}:{parts[1]} ({count} parts)"
    print(f"{done}; {missing_parts(args.out, count)} parts still missing in {args.out}, the manifest is written "
          f"by the run that completes the last one")


def _without_option(argv: Sequence[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE`, abbreviations (as argparse accepts them) included."""
    def names_option(arg: str) -> bool:
        name = arg.split("=", 1)[0]
        return len(name) > 2 and option.startswith(name)

    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif names_option(arg):
            skip = "=" not in arg
        else:
            kept.append(arg)
    return kept


def _verify_shards(args: argparse.Namespace) -> int:
    from tokenization.errors import TokenizationError
    from tokenization.format import read_manifest
    from tokenization.verify import verify_shards

    if not Path(args.folder).is_dir():
        raise TokenizationError(f"{args.folder}: no such folder")
    problems = verify_shards(args.folder)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    manifest = read_manifest(args.folder)
    print(f"{args.folder}: ok ({len(manifest.shards)} shards, {manifest.total_samples} samples, "
          f"{manifest.total_tokens} tokens)")
    return 0


def _config_kind(args: argparse.Namespace) -> type:
    if args.kind:
        return CONFIG_KINDS[args.kind]
    name = Path(args.config).name if args.config else ""
    return next((cls for prefix, cls in KIND_BY_PREFIX.items() if name.startswith(prefix)), RunConfig)


def _show_config(args: argparse.Namespace) -> None:
    cls = _config_kind(args)
    if args.reference:
        if args.overrides:
            args.parser.error("--reference takes no overrides")
        print(config_reference(cls), end="")
        return
    print(dump_yaml(load_config(cls, args.config, args.overrides)), end="")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `distill` and `python -m pipeline`; returns the exit status (2 for bad input or config)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # megatron-core announces at import that it falls back from Transformer Engine and Apex to torch; the
    # pipeline uses torch implementations on purpose, so the notice is noise on every command
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex) .*not installed", category=UserWarning)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in what a stage writes (the manifest's command line)
    from pipeline.eval.errors import RiskError
    from pipeline.model.errors import CheckpointError, ModelLayoutError
    from pipeline.prune.errors import PruneError
    from pipeline.teacher.errors import CacheError
    from pipeline.train.errors import TrainError
    from tokenization.errors import TokenizationError
    from tokenization.format import ShardFormatError

    try:
        return args.handler(args) or 0
    except (ConfigError, TokenizationError, ShardFormatError, CheckpointError, ModelLayoutError, CacheError,
            TrainError, RiskError, GenerateError, PruneError) as err:
        print(f"distill: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"distill: error: {where}{err.strerror if err.filename and err.strerror else err}", file=sys.stderr)
        return 2

"""The `distill generate` subcommand: sample continuations from a checkpoint, printed or written as JSONL.

The model is a Hugging Face folder, a TP checkpoint (`distill convert hf-to-tp`) or a training run
(`distill train`'s run_dir, a checkpoints folder or one tag folder). A training run is first exported
to a temporary Hugging Face folder with `pipeline.train.export.export_checkpoint`, the same offline
consolidation `distill export` uses, then loaded like any other folder: one code path for the weights,
at the cost of one extra write and read of the model (and, under torchrun, one export per rank, so that
ranks on different nodes need no shared temporary folder).

Prompts come from a text file (one per line, tokenized with the tokenizer; blank lines are skipped and
keep their line number in the key, `line-00000007`) or from token shards (the first L tokens of the
first N samples, keyed by the sample's key). The keys seed the draws (`pipeline.generate`), so a
prompt's continuation does not depend on the batch it falls in, on `--batch` or on `--tp`.

Every rank of the TP group decodes; only global rank 0 prints and writes. A world larger than `--tp`
(data-parallel copies) is refused rather than split, since one process's output is the whole answer.
Heavy imports stay inside the handler so that `distill --help` answers at once.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GENERATE_HELP = """\
Sample continuations of prompts from a checkpoint and print them, or write them as JSONL.

MODEL is a Hugging Face folder, a TP checkpoint (distill convert hf-to-tp) or a training run
(distill train's run_dir, whose checkpoints/latest is exported to a temporary folder first).
Prompts come from a text file, one per line (--prompts; blank lines are skipped), or from token
shards (--tokens with --prompt-len: the first L tokens of each sample). Text is tokenized and
decoded with --tokenizer, else the tokenizer.json in the model folder; without a tokenizer, token
shard prompts are shown as ids.

Each prompt's draws are seeded by (--seed, its key): line-00000001 for line 1 of the file, the
sample key for token shards. A rerun gives the same text, whatever --batch and --tp are.
Generation stops at the EOS id (--eos-id, else config.json's eos_token_id, else the tokenizer's
<|endoftext|>, else the shards' EOS) or after --max-new-tokens.

Examples:
  distill generate work/teacher_hf --prompts prompts.txt --max-new-tokens 64
  distill generate work/kd --prompts prompts.txt --greedy              # a training run's latest checkpoint
  distill generate work/teacher_hf --tokens work/shards/heldout --prompt-len 16 --limit 8 \\
      --top-k 30 --seed 1 --output samples.jsonl
  torchrun --nproc-per-node 2 -m pipeline generate work/teacher_tp2 --tp 2 --prompts prompts.txt

--output FILE.jsonl writes one object per prompt: key, prompt, completion (text, null without a
tokenizer), prompt_ids, completion_ids (ending with the EOS id when the prompt stopped there) and
ended_at_eos. The file appears atomically when every prompt is done.
"""


class GenerateError(ValueError):
    """Bad input to `distill generate`: the message names the file, line or key, and what was expected."""


@dataclass(frozen=True)
class Prompt:
    key: str
    ids: list[int]
    text: Optional[str]  # the line as read; None for token-shard prompts


def add_generate_command(commands) -> None:
    """Register `generate` on the `distill` subparsers."""
    gen = commands.add_parser("generate", help="sample continuations of prompts from a checkpoint",
                              description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("model", metavar="MODEL", help="Hugging Face folder, TP checkpoint or training run folder")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line (blank lines skipped)")
    source.add_argument("--tokens", metavar="DIR", help="token-shard folder; prompts are the samples' first tokens")
    gen.add_argument("--prompt-len", type=int, metavar="L", help="--tokens: tokens of each sample used as prompt")
    gen.add_argument("--limit", type=int, metavar="N", help="only the first N prompts (default: all)")
    gen.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or a folder holding one (default: the "
                                                         "model folder's, if any)")
    gen.add_argument("--greedy", action="store_true", help="the most likely token each step (no sampling)")
    gen.add_argument("--temperature", type=float, default=1.0, metavar="T", help="softmax temperature (default 1)")
    gen.add_argument("--top-k", type=int, default=0, metavar="K", help="draw among the K most likely ids (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus mass (default 1: no limit)")
    gen.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="most new tokens per prompt "
                                                                                  "(default 128)")
    gen.add_argument("--eos-id", type=int, metavar="ID", help="stop a prompt at this id (default: see above)")
    gen.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the draws (default 0)")
    gen.add_argument("--batch", type=int, default=16, metavar="B", help="prompts decoded together (default 16)")
    gen.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel size = the world size of "
                                                                    "torchrun (default 1)")
    gen.add_argument("--output", metavar="FILE.jsonl", help="write JSONL here instead of printing the samples")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(handler=run_generate, parser=gen)


def sampling_from_args(args: argparse.Namespace):
    """The SamplingConfig the flags describe; a ConfigError naming the flag when a value is out of range."""
    from pipeline.config import COMMAND_LINE, ConfigError, SamplingConfig, from_dict

    values = {"mode": "greedy" if args.greedy else "sample", "temperature": args.temperature,
              "top_k": args.top_k, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    try:
        return from_dict(SamplingConfig, values)
    except ConfigError as err:
        raise ConfigError(f"--{err.key.replace('_', '-')}", err.problem, COMMAND_LINE) from None


def _check_args(args: argparse.Namespace) -> None:
    if args.tokens is not None and args.prompt_len is None:
        args.parser.error("--tokens needs --prompt-len L")
    if args.prompts is not None and args.prompt_len is not None:
        args.parser.error("--prompt-len applies to --tokens only")
    for flag, value in (("--prompt-len", args.prompt_len), ("--limit", args.limit), ("--batch", args.batch),
                        ("--tp", args.tp)):
        if value is not None and value < 1:
            args.parser.error(f"{flag}: expected ≥ 1, got {value}")
    if not Path(args.model).is_dir():
        raise GenerateError(f"{args.model}: no such model folder")


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from pipeline.parallel import ParallelContext

    _check_args(args)
    sampling = sampling_from_args(args)
    with ParallelContext.from_env(tp=args.tp) as ctx:
        if ctx.dp_size != 1:
            raise GenerateError(f"--tp {args.tp} with a world of {ctx.world_size} processes: generate runs one "
                                f"model, so the world size must equal --tp")
        with model_folder(args.model) as folder:
            tokenizer = _tokenizer(args, folder)
            model = _load(folder, ctx)
            cfg = model.model_config
            prompts, shard_eos = _prompts(args, tokenizer)
            _check_prompts(prompts, cfg, tokenizer, sampling.max_new_tokens, args)
            eos = _eos_id(args, folder, tokenizer, shard_eos)
            with torch.no_grad():
                rows = _decode(model, prompts, sampling, cfg.vocab_size, eos, args, ctx)
        if ctx.rank == 0:
            _report(rows, tokenizer, eos, args)
    return 0


@contextlib.contextmanager
def model_folder(path: str):
    """A folder `load_model` reads: `path` itself, or a training run exported to a temporary folder."""
    folder = Path(path)
    if (folder / "config.json").is_file() or (folder / "layout.json").is_file():
        yield folder
        return
    import tempfile

    from pipeline.model.errors import CheckpointError
    from pipeline.train.export import export_checkpoint, resolve_tag_folder

    try:
        resolve_tag_folder(folder)
    except CheckpointError as err:
        raise GenerateError(f"{path}: not a model: expected a Hugging Face folder (config.json), a TP checkpoint "
                            f"(layout.json) or a training run ({err})") from None
    with tempfile.TemporaryDirectory(prefix="generate-export-") as scratch:
        yield export_checkpoint(folder, Path(scratch) / "hf", progress=False)


def _load(folder: Path, ctx):
    from pipeline.config import ComputeConfig
    from pipeline.model import load_model
    from pipeline.model.tp_checkpoint import is_tp_checkpoint, read_layout

    compute = ComputeConfig()
    if is_tp_checkpoint(folder):  # a TP checkpoint fixes its vocabulary padding; load it as it was split
        compute = ComputeConfig(vocab_multiple=int(read_layout(folder)[1]["vocab_multiple"]))
    return load_model(folder, ctx, compute).eval()


def _tokenizer(args: argparse.Namespace, folder: Path):
    from tokenization.tokenizer import TOKENIZER_FILE, load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer)
    if (folder / TOKENIZER_FILE).is_file():
        return load_tokenizer(folder)
    if args.prompts is not None:
        raise GenerateError(f"{args.prompts}: text prompts need a tokenizer; {args.model} holds no "
                            f"{TOKENIZER_FILE}, so pass --tokenizer PATH")
    return None


def _eos_id(args: argparse.Namespace, folder: Path, tokenizer, shard_eos: Optional[int]) -> Optional[int]:
    """--eos-id, else config.json's eos_token_id (the first of a list), else the tokenizer's <|endoftext|>,
    else the token shards' EOS, else None (stop at --max-new-tokens only)."""
    from tokenization.tokenizer import DEFAULT_EOS

    if args.eos_id is not None:
        return args.eos_id
    config = folder / "config.json"
    if config.is_file():
        found = json.loads(config.read_text()).get("eos_token_id")
        found = found[0] if isinstance(found, list) and found else found
        if isinstance(found, int):
            return found
    if tokenizer is not None and tokenizer.token_to_id(DEFAULT_EOS) is not None:
        return tokenizer.token_to_id(DEFAULT_EOS)
    return shard_eos


def _prompts(args: argparse.Namespace, tokenizer) -> tuple[list[Prompt], Optional[int]]:
    """(the prompts, the token shards' EOS id or None)."""
    if args.prompts is not None:
        return _text_prompts(args.prompts, tokenizer, args.limit), None
    return _shard_prompts(args.tokens, args.prompt_len, args.limit)


def _text_prompts(path: str, tokenizer, limit: Optional[int]) -> list[Prompt]:
    file = Path(path)
    if not file.is_file():
        raise GenerateError(f"{path}: no such prompt file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise GenerateError(f"{path}: not UTF-8 text ({err})") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        ids = tokenizer.encode(line).ids
        if not ids:
            raise GenerateError(f"{path}: line {number} tokenizes to no tokens")
        prompts.append(Prompt(f"line-{number:08d}", ids, line))
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise GenerateError(f"{path}: no prompt (every line is blank)")
    return prompts


def _shard_prompts(folder: str, length: int, limit: Optional[int]) -> tuple[list[Prompt], int]:
    from pipeline.data.shards import ShardReader, is_local
    from pipeline.data.sources import ShardSet
    from tokenization.format import decode_sample

    if is_local(folder) and not Path(folder).is_dir():  # a URL prefix is read with webdataset's gopen
        raise GenerateError(f"{folder}: no such token-shard folder")
    shards = ShardSet(folder)
    manifest = shards.manifest
    if length > manifest.seq_len + 1:
        raise GenerateError(f"--prompt-len {length}: the samples of {folder} hold {manifest.seq_len + 1} tokens")
    prompts = []
    for index, entry in enumerate(manifest.shards):
        count = entry.samples if limit is None else min(entry.samples, limit - len(prompts))
        if count <= 0:
            break
        reader = ShardReader(shards.url(index), expected=entry.samples, where=shards.where(index))
        try:
            for raw in reader.take(count):
                tokens, _ = decode_sample(raw, seq_len=manifest.seq_len, dtype=manifest.dtype,
                                          where=shards.where(index))
                prompts.append(Prompt(raw["__key__"], [int(t) for t in tokens[:length]], None))
        finally:
            reader.close()
    return prompts, manifest.eos_id


def _check_prompts(prompts: list[Prompt], cfg, tokenizer, max_new: int, args: argparse.Namespace) -> None:
    from tokenization.tokenizer import vocab_size

    if tokenizer is not None and vocab_size(tokenizer) > cfg.vocab_size:
        raise GenerateError(f"tokenizer {args.tokenizer or args.model}: {vocab_size(tokenizer)} ids, more than the "
                            f"model's vocabulary of {cfg.vocab_size}; use the tokenizer the model was trained with")
    limit = cfg.max_position_embeddings
    for prompt in prompts:
        if max(prompt.ids) >= cfg.vocab_size:
            raise GenerateError(f"prompt {prompt.key}: token id {max(prompt.ids)} is outside the model's "
                                f"vocabulary of {cfg.vocab_size}")
        if len(prompt.ids) + max_new > limit:
            raise GenerateError(f"prompt {prompt.key}: {len(prompt.ids)} tokens plus --max-new-tokens {max_new} "
                                f"exceed the model's max_position_embeddings of {limit}; shorten the prompt or "
                                f"lower --max-new-tokens")


def _decode(model, prompts: list[Prompt], sampling, vocab: int, eos: Optional[int], args, ctx) -> list[dict]:
    import torch
    from tqdm import tqdm

    from pipeline.generate import generate

    rows = []
    bar = tqdm(total=len(prompts) * sampling.max_new_tokens, desc="generate", unit="tok", file=sys.stderr,
               disable=args.no_progress or ctx.rank != 0, dynamic_ncols=True)
    with bar:
        for start in range(0, len(prompts), args.batch):
            batch = prompts[start: start + args.batch]
            out = generate(model, [torch.tensor(p.ids, dtype=torch.int64) for p in batch], [p.key for p in batch],
                           sampling, vocab_size=vocab, eos_id=eos, seed=args.seed, group=ctx.tp_group,
                           on_step=bar.update)
            for prompt, tokens, ended in zip(batch, out.tokens, out.ended):
                rows.append({"key": prompt.key, "prompt": prompt.text, "prompt_ids": prompt.ids,
                             "completion_ids": tokens.tolist(), "ended_at_eos": bool(ended)})
        bar.total = bar.n  # rows that stopped at EOS left part of the budget unused
        bar.refresh()
    return rows


def _report(rows: list[dict], tokenizer, eos: Optional[int], args: argparse.Namespace) -> None:
    for row in rows:
        ids = row["completion_ids"][:-1] if row["ended_at_eos"] else row["completion_ids"]
        if tokenizer is not None:
            row["completion"] = tokenizer.decode(ids, skip_special_tokens=False)
            if row["prompt"] is None:
                row["prompt"] = tokenizer.decode(row["prompt_ids"], skip_special_tokens=False)
        else:
            row["completion"] = None
    if args.output:
        from tokenization.format import write_atomic

        fields = ("key", "prompt", "completion", "prompt_ids", "completion_ids", "ended_at_eos")
        text = "".join(json.dumps({f: row[f] for f in fields}, ensure_ascii=False) + "\n" for row in rows)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.output, text.encode())
        tokens = sum(len(row["completion_ids"]) for row in rows)
        print(f"wrote {len(rows)} samples ({tokens} new tokens) to {args.output}")
        return
    for row in rows:
        stop = f"stopped at EOS {eos}" if row["ended_at_eos"] else "reached --max-new-tokens"
        print(f"── {row['key']}: {len(row['prompt_ids'])} prompt tokens, {len(row['completion_ids'])} new, {stop}")
        if tokenizer is not None:
            print(f"prompt:     {row['prompt']}")
            print(f"completion: {row['completion']}")
        else:
            print(f"prompt ids:     {row['prompt_ids']}")
            print(f"completion ids: {row['completion_ids']}")

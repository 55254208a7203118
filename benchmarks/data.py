"""Reader throughput of pipeline.data on one core, against plain webdataset iteration in the same run.

Writes a synthetic token-shard folder (default ~200 MB: seq_len 2048, uint16 ids, 1000-sample shards)
to a temporary directory, then times, in this process with one torch thread:
- **ours**: `TokenShardDataset` (shuffled shard order and windows, DP rank 0 of 1, no sidecar, no
  workers), decoding to int64 `[B, seq_len+1]` tensors;
- **baseline**: `webdataset.WebDataset(urls, shardshuffle=False)` with `np.load` of each sample's tokens
  (no batching, no shuffling, no tensors), the floor of what reading these tars costs.
Each is run once to warm the page cache, then timed over one epoch.
Run: .venv/bin/python benchmarks/data.py [--megabytes 200] [--seq-len 2048]
(The tokenizer-throughput half of this benchmark belongs with tokenization/ and is not here yet.)
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.data import TokenShardDataset
from tests.shardmaker import make_token_shards


def read_ours(folder: Path, micro_batch: int) -> tuple[int, int]:
    dataset = TokenShardDataset(str(folder), micro_batch=micro_batch, dp_rank=0, dp_size=1, seed=0, max_epochs=1)
    samples = tokens = 0
    for batch in dataset:
        samples += batch["tokens"].shape[0]
        tokens += batch["tokens"].numel()
    return samples, tokens


def read_baseline(folder: Path, micro_batch: int) -> tuple[int, int]:
    import webdataset as wds
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    samples = tokens = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        array = np.load(io.BytesIO(sample["tokens.npy"]))
        samples, tokens = samples + 1, tokens + array.size
    return samples, tokens


def timed(fn, folder: Path, micro_batch: int) -> tuple[float, int, int]:
    fn(folder, micro_batch)  # warm the page cache
    start = time.perf_counter()
    samples, tokens = fn(folder, micro_batch)
    return time.perf_counter() - start, samples, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=200)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--shard-samples", type=int, default=1000)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sample_bytes = 2 * (args.seq_len + 1) + 2048  # ids + .npy headers + tar headers and padding, roughly
    total = int(args.megabytes * 2**20 / sample_bytes)
    full, rest = divmod(total, args.shard_samples)
    shards = [args.shard_samples] * full + ([rest] if rest else [])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_token_shards(tmp, shards, seq_len=args.seq_len, vocab_size=32000)
        size = sum(p.stat().st_size for p in Path(tmp).glob("*.tar"))
        seconds = time.perf_counter() - start
        print(f"wrote {len(shards)} shards, {total} samples, {size / 2**20:.0f} MB in {seconds:.1f} s")
        rows = [("ours", *timed(read_ours, Path(tmp), args.micro_batch)),
                ("webdataset baseline", *timed(read_baseline, Path(tmp), args.micro_batch))]
    base = rows[1][3] / rows[1][1]
    print(f"seq_len={args.seq_len}, micro_batch={args.micro_batch}, 1 torch thread, torch {torch.__version__}")
    print("| reader | samples | s | samples/s | tokens/s | vs baseline |")
    print("|---|---|---|---|---|---|")
    for name, seconds, samples, tokens in rows:
        print(f"| {name} | {samples} | {seconds:.2f} | {samples / seconds:,.0f} | {tokens / seconds:,.0f} | "
              f"{tokens / seconds / base:.2f} |")


if __name__ == "__main__":
    main()

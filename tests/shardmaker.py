"""Small token-shard folders for the reader's tests, written with the format's own ShardWriter.

Every sample's tokens start with (shard index, offset in shard), so a test can tell which sample it
got; the rest are seeded random ids. Optional per-sample hooks give a sample a loss mask (`mask.npy`)
or a bestfit-style end before `seq_len + 1`. Sidecars mirror a token folder shard by shard and key by key.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from tokenization.format import (SHARD_SUFFIX, SIDECAR_SUFFIX, Manifest, ShardEntry, ShardWriter, encode_sample,
                                 shard_stem, write_manifest)

FINGERPRINT = "f" * 64


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_token_shards(folder, sizes, *, seq_len: int = 8, vocab_size: int = 1000, seed: int = 0,
                      prefix: str = "shard", fingerprint: str = FINGERPRINT, mask_fn=None, end_fn=None) -> Manifest:
    """A folder of len(sizes) shards holding sizes[i] samples each, and its manifest. `mask_fn(shard, offset)`:
    the sample's loss mask or None (no member); `end_fn(shard, offset)`: where its real tokens end (default
    seq_len + 1, no padding)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab_size < 65536 else np.uint32
    entries = []
    for shard, count in enumerate(sizes):
        name, real = f"{prefix}-{shard:06d}{SHARD_SUFFIX}", 0
        with open(folder / name, "wb") as file, ShardWriter(file) as writer:
            for offset in range(count):
                tokens = rng.integers(0, vocab_size, seq_len + 1).astype(dtype)
                tokens[0], tokens[1] = shard, offset
                end = seq_len + 1 if end_fn is None else end_fn(shard, offset)
                cut = 1 + (offset % max(1, end - 2))
                segments = np.array([0, cut, end] if cut < end else [0, end], dtype=np.int32)
                mask = None if mask_fn is None else mask_fn(shard, offset)
                writer.write(encode_sample(f"{prefix}-{shard:06d}-{offset:06d}", tokens, segments, mask))
                real += end
        entries.append(ShardEntry(name, count, real, _sha256(folder / name)))
    manifest = Manifest(fingerprint, vocab_size, 0, seq_len, "concat" if end_fn is None else "bestfit",
                        tuple(entries), "test")
    write_manifest(folder, manifest)
    return manifest


def make_sidecar(folder, token_manifest: Manifest, *, fingerprint: str | None = None, skip_shard: int | None = None,
                 key_fn=None, sources: dict | None = None) -> Manifest:
    """A sidecar folder of plain tars (as the teacher cache writes them): member `target.npy` = the sample's
    (shard, offset); options break it on purpose."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for shard, entry in enumerate(token_manifest.shards):
        if shard == skip_shard:
            continue
        stem = shard_stem(entry.name)
        name = stem + SIDECAR_SUFFIX
        with open(folder / name, "wb") as file, ShardWriter(file, compressed=False) as writer:
            for offset in range(entry.samples):
                buffer = io.BytesIO()
                np.save(buffer, np.array([shard, offset], dtype=np.int64))
                key = f"{stem}-{offset:06d}" if key_fn is None else key_fn(stem, offset)
                writer.write({"__key__": key, "target.npy": buffer.getvalue()})
        entries.append(ShardEntry(name, entry.samples, entry.tokens, _sha256(folder / name)))
    source_shards = {e.name: e.sha256 for e in token_manifest.shards} if sources is None else sources
    manifest = Manifest(fingerprint or token_manifest.tokenizer_fingerprint, token_manifest.vocab_size,
                        token_manifest.eos_id, token_manifest.seq_len, token_manifest.packing, tuple(entries),
                        "test sidecar", extra={"source_shards": source_shards})
    write_manifest(folder, manifest)
    return manifest

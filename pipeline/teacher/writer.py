"""Cache shards on disk: the atomic shard writer, per-shard done records and the final manifest.

A cache shard is a plain tar named after its token shard's stem (`STEM.tar` for `STEM.tar.gz`). It is
written to a hidden `.STEM.tar.partial`, fsynced and renamed, so `STEM.tar` exists only whole;
then a done record `_progress/STEM.json` (samples, positions, bytes, sha256, source shard, floor bits)
is written atomically. A rerun skips shards with a done record and overwrites any stale partial file.
The manifest is written last, by whichever process finds every record present, from the records alone:
it is a pure function of them, so concurrent finishers (a Slurm job array) write the same bytes.

Design choice: the tar is written by format.ShardWriter (webdataset's TarWriter, int mtime 0, no PAX
headers) with sample members in a fixed order, so an interrupted and resumed job produces byte-identical
shards; the cost is that tar metadata carries no real timestamps. Uncompressed, unlike token shards: a
sample's one member is a codec record already near its entropy, so tar's 512-byte header and padding are
all gzip could save: 1-2 % at seq_len 2048 (shards of 1.009-1.015 × their records with the synthetic
targets of `benchmarks/cache.py`, V 32000, top-16 and 50 draws), 10-41 % at seq_len 128, against a gzip
pass in the job's writing path and the loss of seeking when the student resumes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.sources import SOURCE_SHARDS, stem
from pipeline.teacher.identity import PROGRESS_DIR
from tokenization.format import (SIDECAR_SUFFIX, HashingFile, Manifest, ShardEntry, ShardWriter, fsync_dir,
                                 write_atomic, write_manifest)


def partial_path(folder: Path, name: str) -> Path:
    return folder / f".{name}.partial"


def record_path(folder: Path, name: str) -> Path:
    return folder / PROGRESS_DIR / f"{stem(name)}.json"


@dataclass
class ShardRecord:
    """What the manifest needs of one finished cache shard."""

    name: str
    samples: int
    tokens: int
    positions: int
    bytes: int
    sha256: str
    source: str
    source_sha256: str
    floor_bits: float

    @classmethod
    def read(cls, folder: Path, name: str) -> ShardRecord | None:
        path = record_path(folder, name)
        return cls(**json.loads(path.read_text())) if path.exists() else None


def publish(file: HashingFile, partial: Path, final: Path) -> None:
    """Make a shard written to `partial` visible as `final`: fsync, close, rename, fsync the folder."""
    file.file.flush()
    os.fsync(file.file.fileno())
    file.file.close()
    os.replace(partial, final)
    fsync_dir(final.parent)


class CacheShardWriter:
    """Writes one cache shard: samples in order, then `close` makes it visible and records it."""

    def __init__(self, folder: str | Path, name: str, *, source: ShardEntry):
        """`name`: the token shard's name (or any name with its stem); the cache shard is `STEM.tar`."""
        self.folder, self.name, self.source = Path(folder), stem(name) + SIDECAR_SUFFIX, source
        self._file = HashingFile(partial_path(self.folder, self.name))
        self._tar = ShardWriter(self._file, compressed=False)
        self.samples = self.positions = 0
        self.floor_bits = 0.0

    def write(self, key: str, member: str, payload: bytes, *, positions: int, floor_bits: float) -> None:
        self._tar.write({"__key__": key, member: payload})
        self.samples += 1
        self.positions += positions
        self.floor_bits += floor_bits

    def close(self, *, source: ShardEntry | None = None) -> ShardRecord:
        """Publish the shard and its done record; `source` replaces the token shard given at the start (a
        generated token shard is known only once it is written)."""
        self.source = source or self.source
        self._tar.close()
        publish(self._file, partial_path(self.folder, self.name), self.folder / self.name)
        record = ShardRecord(self.name, self.samples, self.source.tokens, self.positions, self._file.size,
                             self._file.sha.hexdigest(), self.source.name, self.source.sha256, self.floor_bits)
        write_atomic(record_path(self.folder, self.name), (json.dumps(record.__dict__, indent=1) + "\n").encode())
        return record

    def abandon(self) -> None:
        """Drop the partial file (an error mid-shard); a rerun starts this shard over."""
        self._file.file.close()
        partial_path(self.folder, self.name).unlink(missing_ok=True)


def write_cache_manifest(folder: str | Path, tokens: Manifest, records: list[ShardRecord], extra: dict) -> Manifest:
    """The cache manifest: the token manifest's fields, these shards, and the cache's own facts."""
    positions = sum(r.positions for r in records)
    stored = sum(r.bytes for r in records)
    facts = dict(extra)
    facts[SOURCE_SHARDS] = {r.source: r.source_sha256 for r in records}
    facts["positions"] = positions
    facts["bytes_per_token"] = round(stored / max(1, positions), 4)
    facts["floor_bytes_per_token"] = round(sum(r.floor_bits for r in records) / 8 / max(1, positions), 4)
    manifest = Manifest(tokens.tokenizer_fingerprint, tokens.vocab_size, tokens.eos_id, tokens.seq_len,
                        tokens.packing, tuple(ShardEntry(r.name, r.samples, r.tokens, r.sha256) for r in records),
                        command="distill cache", extra=facts)
    write_manifest(folder, manifest)
    return manifest

"""Token-shard sets and their sidecars as the reader sees them: manifests, fingerprints, join checks.

A `ShardSet` is one folder (local path or any URL webdataset opens) with its manifest. A sidecar is a
second shard set written from a token-shard set (the teacher cache): one shard per token shard with
the same name stem (`NAME.tar` beside the token shard `NAME.tar.gz`), the same `__key__`s in the same
order, the same tokenizer fingerprint, and `extra["source_shards"]`: {token shard name: sha256 of that
token shard}. The join is checked up front against the manifests (missing shard, different sample
count, foreign source sha256, other tokenizer) and per sample while reading (key by key), and every
mismatch names the shard and key.

Design choice: the dataset fingerprint covers what decides the samples' contents and order (every
shard's name, count and sha256, the tokenizer fingerprint, seq_len), not the sidecars, so a resumed
run may attach a regenerated cache of the same source; the cost is that a stale cache is caught by
the source_shards check, not by the fingerprint.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from webdataset.gopen import gopen

from pipeline.data.shards import is_local, shard_url
from tokenization.format import MANIFEST_NAME, Manifest, ShardFormatError, read_manifest, shard_stem

SOURCE_SHARDS = "source_shards"


def load_manifest(location: str) -> Manifest:
    """The manifest of a local folder or of a URL prefix (fetched with webdataset's gopen)."""
    if is_local(location):
        return read_manifest(location)
    url = f"{location.rstrip('/')}/{MANIFEST_NAME}"
    try:
        with gopen(url, "rb") as stream:
            raw = stream.read()
    except Exception as err:  # noqa: BLE001 - gopen raises many kinds; all mean "cannot read"
        raise ShardFormatError(f"{url}: cannot read the manifest ({err})") from None
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, MANIFEST_NAME).write_bytes(raw)
        try:
            return read_manifest(tmp)
        except ShardFormatError as err:
            raise ShardFormatError(str(err).replace(str(Path(tmp, MANIFEST_NAME)), url)) from None


def stem(name: str) -> str:
    """`00000-00001` of a token shard `00000-00001.tar.gz` and of its sidecar shard `00000-00001.tar`."""
    return shard_stem(name)


@dataclass
class ShardSet:
    """One shard folder and its manifest."""

    location: str
    role: str = "token"  # names the set in errors: "token", or "sidecar 'teacher'"
    manifest: Manifest = field(init=False)

    def __post_init__(self):
        self.location = os.fspath(self.location)
        self.manifest = load_manifest(self.location)
        if not self.manifest.shards:
            raise ShardFormatError(f"{self.location}: the manifest lists no shards")

    def url(self, shard: int) -> str:
        return shard_url(self.location, self.manifest.shards[shard].name)

    def where(self, shard: int) -> str:
        return f"{self.role} shard {self.manifest.shards[shard].name} of {self.location}"

    def fingerprint(self) -> str:
        m = self.manifest
        digest = hashlib.sha256(f"{m.tokenizer_fingerprint}|{m.seq_len}|{m.vocab_size}".encode())
        for s in m.shards:
            digest.update(f"|{s.name}:{s.samples}:{s.sha256}".encode())
        return digest.hexdigest()


def sidecar_shards(tokens: ShardSet, sidecar: ShardSet) -> list[int]:
    """For each token shard, the index of its sidecar shard; every mismatch in the manifests raises."""
    where = f"{sidecar.role} {sidecar.location}"
    if sidecar.manifest.tokenizer_fingerprint != tokens.manifest.tokenizer_fingerprint:
        raise ShardFormatError(f"{where}: tokenizer fingerprint {sidecar.manifest.tokenizer_fingerprint} differs "
                               f"from the token shards' {tokens.manifest.tokenizer_fingerprint}")
    sources = sidecar.manifest.extra.get(SOURCE_SHARDS)
    if not isinstance(sources, dict):
        raise ShardFormatError(f"{where}: manifest extra[{SOURCE_SHARDS!r}] must map token shard names to sha256")
    by_stem = {stem(s.name): i for i, s in enumerate(sidecar.manifest.shards)}
    out = []
    for entry in tokens.manifest.shards:
        index = by_stem.get(stem(entry.name))
        if index is None:
            raise ShardFormatError(f"{where}: has no shard for token shard {entry.name}")
        side = sidecar.manifest.shards[index]
        if sources.get(entry.name) != entry.sha256:
            raise ShardFormatError(f"{where}: shard {side.name} was made from token shard {entry.name} with sha256 "
                                   f"{sources.get(entry.name)}, but that shard's sha256 is {entry.sha256}")
        if side.samples != entry.samples:
            raise ShardFormatError(f"{where}: shard {side.name} has {side.samples} samples, token shard "
                                   f"{entry.name} has {entry.samples}")
        out.append(index)
    return out


def join_sample(sample: dict, side: dict, *, prefix: str, where: str) -> None:
    """Add the sidecar sample's members to `sample["sidecars"]` under `prefix.`; keys must match."""
    if side["__key__"] != sample["__key__"]:
        raise ShardFormatError(f"{where}: sample key {side['__key__']!r} where the token shard has "
                               f"{sample['__key__']!r}; a sidecar key is missing or out of order")
    joined = sample.setdefault("sidecars", {})
    for member, data in side.items():
        if member != "__key__":
            joined[f"{prefix}.{member}"] = data

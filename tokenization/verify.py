"""Check a token-shard folder against its manifest and report every problem, each naming its file.

Design choice: read every shard in full (sha256 of the bytes, then every sample decoded with
format.decode_sample) and collect problems instead of stopping at the first, so one run lists all
the damage; the cost is reading the whole dataset once (decompression bound, ~200 MB/s per core).
Samples are grouped by `format.read_samples` (webdataset's rule), as every reader groups them; a shard
is checked to its end, where gzip's length and CRC catch a truncated or corrupt file.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from tokenization import format as fmt

_KNOWN_MEMBERS = {fmt.TOKENS_MEMBER, fmt.SEGMENTS_MEMBER, "mask.npy"}  # mask.npy: a loss mask (teacher-sampled caches)


def verify_shards(folder: str | Path) -> list[str]:
    """Every problem found in `folder` (empty when it is sound): presence, counts, sha256, samples, keys."""
    folder = Path(folder)
    try:
        manifest = fmt.read_manifest(folder)
    except fmt.ShardFormatError as err:
        return [str(err)]
    problems: list[str] = []
    names = [s.name for s in manifest.shards]
    for name, count in Counter(names).items():
        if count > 1:
            problems.append(f"{folder / fmt.MANIFEST_NAME}: shard {name} is listed {count} times")
    present = {p.name for pattern in (f"*{fmt.SHARD_SUFFIX}", f"*{fmt.SIDECAR_SUFFIX}") for p in folder.glob(pattern)}
    for extra in sorted(present - set(names)):
        problems.append(f"{folder / extra}: shard not listed in the manifest")
    owner: dict[str, str] = {}
    for entry in manifest.shards:
        path = folder / entry.name
        if not path.is_file():
            problems.append(f"{path}: missing (listed in the manifest)")
            continue
        problems.extend(_check_shard(path, entry, manifest, owner))
    return problems


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_shard(path: Path, entry: fmt.ShardEntry, manifest: fmt.Manifest, owner: dict) -> list[str]:
    problems = []
    if _sha256(path) != entry.sha256:
        problems.append(f"{path}: sha256 differs from the manifest's {entry.sha256[:16]}…")
    samples = tokens = 0
    try:
        for sample in _samples(path):
            key = sample["__key__"]
            if key in owner:
                problems.append(f"{path}: duplicate key {key!r} (also in {owner[key]})")
            owner[key] = path.name
            unexpected = sorted(set(sample) - _KNOWN_MEMBERS - {"__key__"})
            if unexpected:
                problems.append(f"{path}: sample {key!r} has unexpected members {unexpected}")
            try:
                _, segments = fmt.decode_sample(sample, seq_len=manifest.seq_len, dtype=manifest.dtype, where=str(path))
            except fmt.ShardFormatError as err:
                problems.append(str(err))
                continue
            samples += 1
            tokens += int(segments[-1])
    except fmt.ShardFormatError as err:  # truncated or corrupt, or a member twice: the rest is unreadable
        return problems + [str(err)]
    if samples != entry.samples:
        problems.append(f"{path}: {samples} readable samples, the manifest lists {entry.samples}")
    if tokens != entry.tokens:
        problems.append(f"{path}: {tokens} tokens, the manifest lists {entry.tokens}")
    return problems


def _samples(path: Path):
    with open(path, "rb") as stream:
        yield from fmt.read_samples(stream, compressed=fmt.is_compressed(path.name), where=str(path))

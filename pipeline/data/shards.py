"""Read raw samples of one shard in order, starting at any sample, with webdataset's tar iteration.

A `ShardReader` yields raw webdataset samples (dict: `__key__` plus member bytes, undecoded) of one
shard from sample `start` on, and checks the shard against its manifest entry: sample count (a shard
that ends early or runs long is an error), tar structure, gzip length and CRC for a compressed (token)
shard, and, when `verify` is on, the sha256.

Design choice: members come from `webdataset.tariterators.tar_file_iterator` and are grouped by
webdataset's `group_by_keys` (both through `format.read_samples`, the one grouping rule), so any URL
`gopen` opens works: local files, `pipe:`, http, .... To start at sample k of a local plain tar (a
sidecar shard), the reader walks the tar headers with seeks (512 bytes read per member, no data) and
hands webdataset a file positioned at sample k's first header. A gzip-compressed token shard cannot
seek, nor can a stream: the reader decompresses and skips the members before sample k without
decoding them. Either way resume cost is bounded by one shard, never by the stream position.
Verification costs a full extra read of each shard once per process.
"""
from __future__ import annotations

import hashlib
import re
import tarfile
from pathlib import Path

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from tokenization.format import ShardFormatError, is_compressed, read_samples

_VERIFIED: set[str] = set()
_META = re.compile(r"__[^/]*__($|/)")  # members webdataset's tar_file_iterator skips; never counted


def is_local(location: str) -> bool:
    return "://" not in location and not location.startswith("pipe:")


def sha256_of(url: str) -> str:
    digest = hashlib.sha256()
    with gopen(url, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_shard(url: str, expected_sha256: str, *, where: str) -> None:
    """sha256 of the shard against the manifest, once per process and url."""
    if url in _VERIFIED:
        return
    try:
        actual = sha256_of(url)
    except OSError as err:
        raise ShardFormatError(f"{where}: cannot read for verification: {err}") from None
    if actual != expected_sha256:
        raise ShardFormatError(f"{where}: sha256 {actual} does not match the manifest's {expected_sha256}")
    _VERIFIED.add(url)


def _header_offset(path: str, start: int, *, where: str) -> int:
    """Byte offset of the first member header of sample `start` (headers only, data skipped by seek)."""
    ordinal, last_key = -1, None
    with tarfile.open(path, "r:") as tar:
        while (info := tar.next()) is not None:
            key, _ = base_plus_ext(info.name)
            if info.isreg() and not _META.match(info.name) and key != last_key:
                ordinal, last_key = ordinal + 1, key
                if ordinal == start:
                    return info.offset
    raise ShardFormatError(f"{where}: has {ordinal + 1} samples, cannot start at sample {start}")


class ShardReader:
    """Raw samples of one shard from sample `start` on; `next_index` is the next sample's index."""

    def __init__(self, url: str, *, expected: int, start: int = 0, where: str):
        self.url, self.expected, self.next_index, self.where = url, expected, start, where
        if not 0 <= start <= expected:
            raise ShardFormatError(f"{where}: cannot start at sample {start} of {expected}")
        self._samples = self._iterate(start)

    def _open(self, start: int):
        """(stream, index of its first sample) — positioned at `start` when the file is a local plain tar."""
        if start > 0 and is_local(self.url) and not is_compressed(self.url):
            offset = _header_offset(self.url, start, where=self.where)
            stream = open(self.url, "rb")  # noqa: SIM115 - closed by _iterate's finally
            stream.seek(offset)
            return stream, start
        return gopen(self.url, "rb"), 0

    def _iterate(self, start: int):
        try:
            stream, first = self._open(start)
        except (OSError, tarfile.TarError) as err:
            raise ShardFormatError(f"{self.where}: cannot open: {err}") from None
        state = {"index": first - 1, "key": None}

        def keep(fname: str) -> bool:  # sees every member name before webdataset reads its data
            key, _ = base_plus_ext(fname)
            if key != state["key"]:
                state["index"], state["key"] = state["index"] + 1, key
            return state["index"] >= start

        try:
            yield from read_samples(stream, compressed=is_compressed(self.url), where=self.where, select=keep)
        finally:
            stream.close()

    def take(self, count: int) -> list[dict]:
        """The next `count` raw samples; checks the shard ends where the manifest says."""
        out = []
        for _ in range(count):
            if self.next_index >= self.expected:
                raise ShardFormatError(f"{self.where}: asked for sample {self.next_index} of {self.expected}")
            sample = next(self._samples, None)
            if sample is None:
                raise ShardFormatError(f"{self.where}: ends after {self.next_index} samples, the manifest says "
                                       f"{self.expected}; truncated?")
            out.append(sample)
            self.next_index += 1
        if self.next_index == self.expected and (extra := next(self._samples, None)) is not None:
            raise ShardFormatError(f"{self.where}: has a sample {extra['__key__']!r} past the manifest's "
                                   f"{self.expected} samples")
        return out

    def skip_to(self, index: int) -> None:
        """Read forward (no decoding) to sample `index` ≥ next_index."""
        if index < self.next_index:
            raise ValueError(f"{self.where}: cannot skip back from {self.next_index} to {index}")
        self.take(index - self.next_index)

    def close(self) -> None:
        self._samples.close()


def shard_url(location: str, name: str) -> str:
    return str(Path(location) / name) if is_local(location) else f"{location.rstrip('/')}/{name}"

"""The on-disk contract of token shards: shard files, sample members, token dtype, and manifest.json.

Everything that writes or reads token shards (the tokenizer's shard writer, the streaming reader,
the teacher cache job, verification) goes through this module, so the format lives in one place.

A token-shard folder holds `manifest.json` and webdataset shards `NAME.tar.gz`: one gzip stream
(level 1, gzip mtime 0, no file name) holding a ustar tar (member mtime 0, no PAX headers). Each
sample has:
- `__key__`: unique in the dataset, deterministic (a rerun produces the same keys);
- `tokens.npy`: `seq_len + 1` token ids (inputs and labels are shifts of one array), uint16 when the
  vocabulary has fewer than 65536 entries, else uint32;
- `segments.npy`: int32 `[s0=0, s1, ..., sn, end]`: the start of each document piece in the sample,
  then the end of real tokens (`end < seq_len + 1` only where bestfit packing padded the sample);
- `mask.npy` (optional; generated sequences, where the prompt is not trained on): uint8 `[seq_len]`,
  1 where input position t counts in the loss (its label is token t + 1), else 0. Absent means every
  position with a real label counts. A position past `end` counts nowhere whatever its mask says. A
  folder's manifest may say so in `extra["loss_mask"]`; readers never require it.
Members are grouped into samples by webdataset's own rule (`group_by_keys` with `base_plus_ext`: the
key is the name before the first dot), here and in every reader, so a plain `wds.WebDataset(url)` sees
the same samples with the same keys (it decompresses `.tar.gz` by itself).

Design choice: compress the whole shard. A tar member costs a 512-byte header and pads its data to
512 bytes, so a sample of 2049 uint16 ids (4098 bytes) takes 5120 bytes even as one member with no PAX
header (1.25×); format 1 (two members, 1 KiB PAX headers from a float mtime, no compression) took 2.0×
the ids at seq_len 2048 and 15.9× at seq_len 128. In a gzip stream a sample's headers and zero padding
cost tens of bytes and the ids themselves compress (BPE ids of text), so the members stay
self-describing .npy files. `benchmarks/data.py --part storage` on shards this writer made from the
quickstart's novels (vocabulary 4096): 0.69× the ids at seq_len 2048, 0.93× at seq_len 128; uniformly
random (incompressible) ids: 1.02× at seq_len 2048. The costs: (1) no seeking inside a shard: starting
at sample k decompresses (without decoding) the k samples before it, so a resume reads up to one shard;
(2) CPU: level 1 compresses about 50 MB of ids per second per core, some 3 % of the tokenizer's time
(about 2 MB of ids per second per core), and decompresses about 200 MB/s; (3) the byte-identical rerun
holds for the same zlib build: another zlib (zlib-ng, say) may write other bytes for the same samples
(readable, but with another sha256).
Sidecar shards (the teacher cache) stay plain `NAME.tar`: a sample there is one member holding a codec
record already near its entropy, tens of KiB at seq_len 2048, where tar's overhead is about 2 %.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import threading
import tarfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

FORMAT_VERSION = 2  # 1: plain .tar shards, PAX headers (float mtime); 2: gzip-compressed .tar.gz, no PAX
MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".tar.gz"  # token shards
SIDECAR_SUFFIX = ".tar"  # sidecar shards (the teacher cache): plain tars
GZIP_LEVEL = 1
TOKENS_MEMBER = "tokens.npy"
SEGMENTS_MEMBER = "segments.npy"
MASK_MEMBER = "mask.npy"  # optional: uint8 [seq_len], 1 where position t counts in the loss
PACKING_MODES = ("concat", "bestfit")


class ShardFormatError(ValueError):
    """A token-shard folder, shard, sample or manifest that does not follow the format; names where."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies of fewer than 65536 entries, else uint32."""
    if not 0 < vocab_size <= 2**32:
        raise ShardFormatError(f"vocab_size: expected 0 < vocab_size ≤ 2^32, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_sample(key: str, tokens: np.ndarray, segments: np.ndarray, mask=None) -> dict:
    """A webdataset sample dict (member bytes ready to write) for one packed window; with `mask` (bool or
    integer 0/1, one entry per input position: len(tokens) − 1), also its loss mask as uint8."""
    sample = {"__key__": key, TOKENS_MEMBER: _npy_bytes(tokens), SEGMENTS_MEMBER: _npy_bytes(segments.astype(np.int32))}
    if mask is not None:
        sample[MASK_MEMBER] = _npy_bytes(_mask_array(key, np.asarray(mask), len(tokens) - 1))
    return sample


def _mask_array(key: str, mask: np.ndarray, seq_len: int) -> np.ndarray:
    if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.integer):
        raise ShardFormatError(f"sample {key!r}: mask must be bool or integer 0/1, got dtype {mask.dtype}")
    if mask.shape != (seq_len,):
        raise ShardFormatError(f"sample {key!r}: mask must have one entry per input position, shape [{seq_len}], "
                               f"got {list(mask.shape)}")
    if not np.isin(mask, (0, 1)).all():
        raise ShardFormatError(f"sample {key!r}: mask values must be 0 or 1, got {np.unique(mask).tolist()[:8]}")
    return mask.astype(np.uint8)


def decode_sample(sample: dict, *, seq_len: int, dtype: np.dtype, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segments) of a raw webdataset sample; a ShardFormatError naming `where` and the key."""
    key = sample.get("__key__", "?")
    try:
        tokens = np.load(io.BytesIO(sample[TOKENS_MEMBER]), allow_pickle=False)
        segments = np.load(io.BytesIO(sample[SEGMENTS_MEMBER]), allow_pickle=False)
    except KeyError as missing:
        raise ShardFormatError(f"{where}: sample {key!r} has no member {missing.args[0]!r}") from None
    except (ValueError, OSError) as err:
        raise ShardFormatError(f"{where}: sample {key!r} has an undecodable member: {err}") from None
    if tokens.dtype != dtype or tokens.shape != (seq_len + 1,):
        raise ShardFormatError(f"{where}: sample {key!r}: {TOKENS_MEMBER} is {tokens.dtype}{list(tokens.shape)}, "
                               f"expected {dtype}[{seq_len + 1}]")
    if segments.dtype != np.int32 or segments.ndim != 1 or len(segments) < 2 or segments[0] != 0 \
            or np.any(np.diff(segments) <= 0) or segments[-1] > seq_len + 1:
        raise ShardFormatError(f"{where}: sample {key!r}: {SEGMENTS_MEMBER} must be increasing int32 "
                               f"[0, ..., end ≤ {seq_len + 1}], got {segments.tolist()[:8]}")
    return tokens, segments


def decode_mask(sample: dict, *, seq_len: int, where: str) -> np.ndarray | None:
    """The sample's loss mask (uint8 [seq_len] of 0/1), or None when it has no `mask.npy`; a ShardFormatError
    naming `where` and the key when the member is not uint8 [seq_len] of 0 and 1."""
    if MASK_MEMBER not in sample:
        return None
    key = sample.get("__key__", "?")
    try:
        mask = np.load(io.BytesIO(sample[MASK_MEMBER]), allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ShardFormatError(f"{where}: sample {key!r} has an undecodable member {MASK_MEMBER!r}: {err}") from None
    if mask.dtype != np.uint8 or mask.shape != (seq_len,):
        raise ShardFormatError(f"{where}: sample {key!r}: {MASK_MEMBER} is {mask.dtype}{list(mask.shape)}, "
                               f"expected uint8[{seq_len}]")
    if mask.max(initial=0) > 1:
        raise ShardFormatError(f"{where}: sample {key!r}: {MASK_MEMBER} must hold 0 and 1 only, got "
                               f"{np.unique(mask).tolist()[:8]}")
    return mask


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest records it."""

    name: str
    samples: int
    tokens: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What manifest.json records about a token-shard folder."""

    tokenizer_fingerprint: str
    vocab_size: int
    eos_id: int
    seq_len: int
    packing: str
    shards: tuple = ()
    command: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data.update(token_dtype=str(self.dtype), total_samples=self.total_samples, total_tokens=self.total_tokens)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


_REQUIRED = {"format_version": int, "tokenizer_fingerprint": str, "vocab_size": int, "eos_id": int,
             "seq_len": int, "packing": str, "shards": list}


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """The manifest of a token-shard folder, checked field by field."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardFormatError(f"{path}: missing; a token-shard folder needs its {MANIFEST_NAME}") from None
    except json.JSONDecodeError as err:
        raise ShardFormatError(f"{path}: not valid JSON ({err})") from None
    for key, kind in _REQUIRED.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise ShardFormatError(f"{path}: field {key!r} must be {kind.__name__}, got {data.get(key)!r}")
    if data["format_version"] != FORMAT_VERSION:
        raise ShardFormatError(_version_message(Path(folder), data))
    if data["packing"] not in PACKING_MODES:
        raise ShardFormatError(f"{path}: packing {data['packing']!r} is not one of {PACKING_MODES}")
    shards = tuple(_shard_entry(path, i, s) for i, s in enumerate(data["shards"]))
    return Manifest(data["tokenizer_fingerprint"], data["vocab_size"], data["eos_id"], data["seq_len"],
                    data["packing"], shards, data.get("command", ""), data["format_version"], data.get("extra", {}))


def _version_message(folder: Path, data: dict) -> str:
    found = data["format_version"]
    if found < FORMAT_VERSION and "targets" in data.get("extra", {}):
        remedy = ("re-run `distill tokenize shard` into a fresh folder for its token shards, then `distill cache` "
                  "into a fresh folder for this cache")
    elif found < FORMAT_VERSION:
        remedy = "re-run `distill tokenize shard` (same inputs and options) into a fresh folder to rewrite it"
    else:
        remedy = "it was written by a newer version of this code: read it with that version"
    return (f"{folder}: its shards are format_version {found}, this version reads format_version {FORMAT_VERSION} "
            f"only; {remedy}")


def shard_stem(name: str) -> str:
    """A shard's name without its suffix: what a token shard and its sidecar shards share."""
    for suffix in (SHARD_SUFFIX, SIDECAR_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _shard_entry(path: Path, index: int, raw) -> ShardEntry:
    try:
        entry = ShardEntry(raw["name"], int(raw["samples"]), int(raw["tokens"]), str(raw["sha256"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ShardFormatError(f"{path}: shards[{index}] needs name, samples, tokens and sha256 ({err!r})") from None
    if "/" in entry.name or not entry.name.endswith((SHARD_SUFFIX, SIDECAR_SUFFIX)):
        raise ShardFormatError(f"{path}: shards[{index}].name {entry.name!r} must be a {SHARD_SUFFIX} (or a sidecar's "
                               f"{SIDECAR_SUFFIX}) file name in the folder")
    return entry


def is_compressed(name: str) -> bool:
    """Whether a shard (by its name or URL) is a gzip stream (a token shard) rather than a plain tar (a sidecar)."""
    return name.endswith(".gz")


class ShardWriter:
    """Samples (webdataset dicts of member bytes) into one shard on `fileobj`, which the caller owns.

    Compressed (token shards): a gzip stream with a fixed level, mtime 0 and no file name around the tar
    that webdataset's TarWriter writes with an int mtime (a float one adds a 1 KiB PAX header to every
    member), so the same samples give the same bytes. Not compressed: the plain tar (sidecar shards).
    """

    def __init__(self, fileobj: BinaryIO, *, compressed: bool = True):
        import webdataset as wds

        self._gzip = gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=fileobj,
                                   mtime=0) if compressed else None
        self._tar = wds.TarWriter(self._gzip or fileobj, encoder=False, compress=False, mtime=0)

    def write(self, sample: dict) -> None:
        self._tar.write(sample)

    def close(self) -> None:
        self._tar.close()  # the end-of-archive blocks
        if self._gzip is not None:
            self._gzip.close()  # the gzip trailer (length and CRC); leaves `fileobj` open

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_samples(stream: BinaryIO, *, compressed: bool, where: str,
                 select: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """Raw samples (`__key__` plus undecoded member bytes) of one shard stream, in order.

    Members come from webdataset's `tar_file_iterator` (`select(name)` may skip a member before its data
    is read) and are grouped by webdataset's `group_by_keys`. A compressed stream is read to its end after
    the last sample, so gzip checks its length and CRC. A truncated or corrupt shard, a member twice in one
    sample and a member name with no KEY.EXTENSION form raise a ShardFormatError naming `where`.
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    source = gzip.GzipFile(fileobj=stream, mode="rb") if compressed else stream

    def members():
        for member in tar_file_iterator(source, select_files=select):
            member["__url__"] = where  # group_by_keys copies it into the sample; removed below
            yield member

    try:
        for sample in group_by_keys(members(), keys=_key_rule(where)):
            del sample["__url__"]
            yield sample
        while compressed and source.read(1 << 20):
            pass
    except ShardFormatError as err:
        raise ShardFormatError(str(err.args[0])) from None  # webdataset appends its context to args
    except (OSError, EOFError, ValueError, tarfile.TarError, zlib.error) as err:
        raise _read_error(err, where) from None


def _read_error(err: Exception, where: str) -> ShardFormatError:
    from webdataset.tariterators import base_plus_ext

    message = str(err.args[0] if err.args else err).split(" @ <")[0]  # webdataset appends the stream's repr
    if isinstance(err, ValueError) and ": duplicate file name" in message:  # group_by_keys' words
        name = message.split(": duplicate file name")[0]
        return ShardFormatError(f"{where}: sample {base_plus_ext(name)[0]!r} has member {name!r} twice")
    return ShardFormatError(f"{where}: truncated or corrupt ({type(err).__name__}: {message})")


def _key_rule(where: str) -> Callable[[str], tuple[str, str]]:
    """webdataset's key rule (`base_plus_ext`: key = the name before the first dot), strict about names."""
    from webdataset.tariterators import base_plus_ext

    def rule(name: str) -> tuple[str, str]:
        key, suffix = base_plus_ext(name)
        if key is None:
            raise ShardFormatError(f"{where}: member {name!r} has no KEY.EXTENSION name")
        return key, suffix
    return rule


class HashingFile:
    """A write-only file that hashes and counts the bytes passing through it (a shard being written)."""

    def __init__(self, path: str | os.PathLike):
        self.file = open(path, "wb")  # noqa: SIM115 - the shard writer closes it
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.file.write(data)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _synced_temporary(path: Path, data: bytes) -> Path:
    """`data` written and fsynced under a name private to this process and thread, beside `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, rename: the file appears whole or not at all."""
    path = Path(path)
    os.replace(_synced_temporary(path, data), path)
    fsync_dir(path.parent)


def create_once(path: str | os.PathLike, data: bytes) -> bool:
    """Create `path` whole with `data` unless it exists; False if another process created it first.

    The file is written under a private name, then hard-linked into place: the link fails if the name exists,
    so concurrent runs (a job array's tasks) cannot both think they recorded their job. Where hard links are
    unsupported, falls back to an atomic replace (the last writer wins; concurrent runs with different
    settings are then not caught).
    """
    path = Path(path)
    tmp = _synced_temporary(path, data)
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    except OSError:  # no hard links on this file system
        os.replace(tmp, path)
        created = True
    finally:
        tmp.unlink(missing_ok=True)
    if created:
        fsync_dir(path.parent)
    return created


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> None:
    write_atomic(Path(folder) / MANIFEST_NAME, manifest.to_json().encode())

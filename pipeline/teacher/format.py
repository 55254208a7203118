"""The cache format's facts in one place: member names, the manifest's `targets` record, the codec it names.

A cache sample holds one member, `topk.bin` or `sampled.bin`, the codec's record of the sample's
target positions (position t is the teacher's distribution for the token at t+1, computed from
positions ≤ t: the trainer's shift, whose labels are the tokens moved left by one). Only positions
whose label is a real token get a target: t + 1 < end, `end` the token sample's last `segments` entry, so a record holds `end − 1`
positions, `seq_len` for every sample but a bestfit one that was padded (`target_positions`). The
manifest's `extra["targets"]` says which codec and with which parameters (`positions_per_sample` is
the most a record holds), so a reader needs nothing but the manifest and the token sample's
segments to decode.

Design choice: padding gets no record at all rather than a placeholder, so it costs neither teacher
top-K/sampling time nor bytes; the cost is that a reader must know each sample's end (it has the
token sample beside the cache sample anyway) and a record of 0 positions (a bestfit sample holding
one token) is empty.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from pipeline.config import TargetsConfig
from pipeline.teacher.codec import SampledCodec, TopkCodec, choose_value_bits
from pipeline.teacher.errors import CacheError

FORMAT = "distill-cache"
FORMAT_VERSION = 2  # 2: records hold real positions only (1 held seq_len, padding included)
MEMBERS = {"topk": "topk.bin", "sampled": "sampled.bin"}


def targets_record(cfg: TargetsConfig, vocab_size: int, positions: int) -> dict:
    """What the manifest records about the targets (everything that decides their decoding)."""
    record = {"format": FORMAT, "format_version": FORMAT_VERSION, "mode": cfg.mode, "vocab_size": vocab_size,
              "positions_per_sample": positions, "temperature": cfg.temperature, "member": MEMBERS[cfg.mode]}
    if cfg.mode == "topk":
        if cfg.k > vocab_size:
            raise CacheError(f"targets.k: {cfg.k} exceeds the teacher's vocab_size {vocab_size}")
        bits = cfg.value_bits or choose_value_bits(vocab_size, cfg.k, positions)
        codec = TopkCodec(vocab_size, cfg.k, positions, bits)
        record.update(k=cfg.k, value_bits=bits, ratio_error_bound=codec.ratio_error_bound())
    else:
        record.update(draws=cfg.draws)
    return record


def codec_of(record: dict, where: str = "cache manifest") -> TopkCodec | SampledCodec:
    """The codec a manifest's targets record names; a clear error for a record this version cannot read."""
    try:
        if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{where}: targets format {record.get('format')!r} v{record.get('format_version')} "
                             f"is not {FORMAT} v{FORMAT_VERSION}, the one this version reads")
        if record["mode"] == "topk":
            return TopkCodec(record["vocab_size"], record["k"], record["positions_per_sample"], record["value_bits"])
        if record["mode"] == "sampled":
            return SampledCodec(record["vocab_size"], record["draws"], record["positions_per_sample"])
    except (KeyError, TypeError) as err:
        raise CacheError(f"{where}: targets record lacks or mistypes {err}; is this a cache folder?") from None
    raise CacheError(f"{where}: targets mode {record.get('mode')!r} is not topk or sampled")


def target_positions(segments) -> np.ndarray:
    """How many positions of each token sample get a target: `end − 1`, end = its real tokens' end.

    `segments`: one sample's segments [S] (format.decode_sample) or a batch's [B, W] padded with −1
    (data.dataset.collate); each row's largest entry is its end. Returns an int64 array [] or [B].
    """
    ends = np.asarray(segments).max(axis=-1)
    return np.maximum(ends.astype(np.int64) - 1, 0)


@functools.lru_cache(maxsize=64)
def sized_codec(codec, positions: int):
    """`codec` for a record of `positions` positions (a padded sample's shorter record)."""
    return codec if codec.positions == positions else dataclasses.replace(codec, positions=positions)


def encode_record(codec, positions: int, *arrays) -> bytes:
    """The record of `positions` target positions (empty for 0); `arrays` as the codec's encode takes them."""
    return sized_codec(codec, positions).encode(*arrays) if positions else b""


def decode_record(codec, payload: bytes, positions: int, where: str = "") -> tuple:
    """The codec's decoded arrays of a record of `positions` target positions; a CacheError naming
    `where` when the record does not hold that many."""
    if positions == 0:
        if payload:
            raise CacheError(f"{where}: the token sample has no position with a real label, so its record must "
                             f"be empty; it holds {len(payload)} bytes (a cache of another format version?)")
        width = codec.k if isinstance(codec, TopkCodec) else 1
        ids = np.zeros((0, width), np.int64)
        if isinstance(codec, TopkCodec):
            return ids, np.zeros((0, width), np.float32), np.zeros(0, np.float32)
        return ids, np.zeros((0, width), np.int64)
    return sized_codec(codec, positions).decode(payload, where=f"{where} ({positions} target positions)")

"""The cache format's facts in one place: member names, the manifest's `targets` record, the codec it names.

A cache sample holds one member, `topk.bin` or `sampled.bin`, the codec's record of the sample's
`seq_len` positions (position t is the teacher's distribution for the token at t+1, computed from
positions ≤ t: the trainer's shift, whose labels are the tokens moved left by one). The manifest's
`extra["targets"]` says which codec and with which parameters, so a reader needs nothing but the
manifest to decode.
"""
from __future__ import annotations

from pipeline.config import TargetsConfig
from pipeline.teacher.codec import SampledCodec, TopkCodec, choose_value_bits
from pipeline.teacher.errors import CacheError

FORMAT = "distill-cache"
FORMAT_VERSION = 1
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

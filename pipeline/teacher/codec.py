"""The record codecs of the teacher cache: one sample's S positions of top-K or sampled targets as bytes.

Design: ids are stored as one Elias–Fano set of global keys `pos·V + id` over the whole sample (universe
S·V, up to 2^52), so any vocabulary up to 2^32 keeps every id exact (no 16/17-bit id fields) and costs
within about 2 bits per id of the floor log2 C(V, K). Top-K values are quantised by cube-root companding
of each entry's ratio to its row's top, r = p / p_top ∈ (0, 1]: u = 1 − r^(1/3), code = round(u·M),
M = 2^b − 1, which spends the codes where the distillation loss is sensitive (large ratios) while
keeping small ratios coarse. Sampled targets store the drawn ids the same way and the counts as the
per-row running sums (an Elias–Fano set of `pos·N + C_j` over universe S·N).

Guarantees (top-K): ids and `log_rest` are returned exactly (log_rest bit for bit); every decoded entry
is > 0 and its ratio to its row's top satisfies |r̂ − r| ≤ 1.5/M before renormalisation
(`TopkCodec.ratio_error_bound`); the K decoded entries then hold exactly the stored mass
1 − exp(log_rest), to float rounding. Sampled targets round-trip exactly.

Cost: encode and decode are whole-array numpy (no Python loops over positions or entries); decoding
a top-K record costs one Elias–Fano decode, one bit unpack and two table gathers per entry (the code →
log r̂ tables are built once per codec), a few int64 temporaries of S·K items.

Shapes: S positions, K entries per position, V vocab, W/U unique drawn ids per position, N draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.teacher.bits import (
    ef_block_bytes,
    ef_decode,
    ef_encode,
    ef_size_bits,
    pack_uint,
    packed_bytes,
    unpack_uint,
)
from pipeline.teacher.errors import CacheError

MAX_VOCAB = 1 << 32
_REST = np.dtype("<f4")


def _fail(where: str, message: str) -> CacheError:
    return CacheError(f"{where}: {message}" if where else message)


def _check_field(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not low <= value <= high:
        raise CacheError(f"{name}: expected an integer in [{low}, {high}], got {value!r}")


def _check_shape(name: str, array: np.ndarray, shape: tuple) -> None:
    if array.shape != shape:
        raise CacheError(f"{name}: expected shape {shape}, got {array.shape}")


def _check_integer(name: str, array: np.ndarray) -> None:
    if array.size and array.dtype.kind not in "iu":
        raise CacheError(f"{name}: expected integers, got dtype {array.dtype}")


def _log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


@dataclass(frozen=True)
class TopkCodec:
    """Top-K targets of one sample: ids [S, K], log-probs [S, K] and the rest's log-mass [S]."""

    vocab_size: int
    k: int
    positions: int
    value_bits: int
    _tables: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_field("vocab_size", self.vocab_size, 1, MAX_VOCAB)
        _check_field("k", self.k, 1, self.vocab_size)
        _check_field("positions", self.positions, 1, 1 << 31)
        _check_field("value_bits", self.value_bits, 1, 16)
        top = self._top_code
        u_hat = np.arange(top + 1, dtype=np.float64) / top
        u_hat[top] = 1.0 - 0.25 / top
        ratio = (1.0 - u_hat) ** 3
        object.__setattr__(self, "_tables", (ratio, np.log(ratio)))

    @property
    def _top_code(self) -> int:
        return (1 << self.value_bits) - 1

    def ratio_error_bound(self) -> float:
        """Most any decoded entry's ratio to its row's top is off, before renormalisation: 1.5 / M."""
        return 1.5 / self._top_code

    def floor_bits(self) -> float:
        """Information floor of one position's id set, log2 C(V, K)."""
        return _log2_binomial(self.vocab_size, self.k)

    def id_bits(self) -> float:
        """Bits one position's ids take (the sample's Elias–Fano block per position, header excluded)."""
        return ef_size_bits(self.positions * self.k, self.positions * self.vocab_size) / self.positions

    def record_bits(self) -> float:
        """Bits one position takes: ids plus K value codes (the float32 log_rest field excluded)."""
        return self.id_bits() + self.k * self.value_bits

    def record_bytes(self) -> int:
        """Exact length of an encoded record."""
        count, universe = self.positions * self.k, self.positions * self.vocab_size
        return (self.positions * _REST.itemsize + ef_block_bytes(count, universe)
                + packed_bytes(count, self.value_bits))

    def encode(self, ids: np.ndarray, logprobs: np.ndarray, log_rest: np.ndarray) -> bytes:
        """Record bytes: log_rest as S little-endian float32, the ids' Elias–Fano block, the value codes."""
        shape = (self.positions, self.k)
        ids, logprobs, log_rest = np.asarray(ids), np.asarray(logprobs), np.asarray(log_rest)
        _check_shape("ids", ids, shape)
        _check_shape("logprobs", logprobs, shape)
        _check_shape("log_rest", log_rest, shape[:1])
        _check_integer("ids", ids)
        ids = ids.astype(np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise CacheError(f"ids: expected values in [0, {self.vocab_size}), got [{ids.min()}, {ids.max()}]")
        if self.k > 1 and not (ids[:, 1:] > ids[:, :-1]).all():
            raise CacheError("ids: each row must be strictly ascending")
        self._check_values(logprobs, log_rest)
        keys = (np.arange(self.positions, dtype=np.int64)[:, None] * self.vocab_size + ids).reshape(-1)
        rest = log_rest.astype(_REST).tobytes()
        universe = self.positions * self.vocab_size
        return rest + ef_encode(keys, universe) + pack_uint(self._quantise(logprobs), self.value_bits).tobytes()

    @staticmethod
    def _check_values(logprobs: np.ndarray, log_rest: np.ndarray) -> None:
        if not (np.isfinite(logprobs).all() and (logprobs <= 0).all()):
            raise CacheError("logprobs: expected finite log-probabilities ≤ 0")
        if np.isnan(log_rest).any() or not (log_rest < 0).all():
            raise CacheError("log_rest: expected log-masses < 0 (-inf allowed); the K entries must hold some mass")

    def _quantise(self, logprobs: np.ndarray) -> np.ndarray:
        """[S, K] codes: round(M · (1 − r^(1/3))), r = exp(lp − rowmax lp); a row's top gets code 0."""
        logprobs = logprobs.astype(np.float64)
        ratio = np.exp(logprobs - logprobs.max(axis=1, keepdims=True))
        return np.rint((1.0 - np.cbrt(ratio)) * self._top_code).astype(np.int64)

    def decode(self, data: bytes, where: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [S, K] int64, logprobs [S, K] float32, log_rest [S] float32) of a record."""
        expected = self.record_bytes()
        if len(data) != expected:
            raise _fail(where, f"top-K record of {self.positions} positions × K={self.k} (V={self.vocab_size}, "
                               f"{self.value_bits}-bit values) must be {expected} bytes, got {len(data)}")
        buf = np.frombuffer(data, np.uint8)
        rest_bytes = self.positions * _REST.itemsize
        log_rest = buf[:rest_bytes].view(_REST).astype(np.float32)
        ids, offset = self._decode_ids(buf, rest_bytes, where)
        codes = unpack_uint(buf, ids.size, self.value_bits, offset, where)
        return ids, self._dequantise(codes, log_rest), log_rest

    def _decode_ids(self, buf: np.ndarray, offset: int, where: str) -> tuple[np.ndarray, int]:
        """(ids [S, K], offset past the block); checks count, strict order and K ids per row."""
        count = self.positions * self.k
        keys, end = ef_decode(buf, self.positions * self.vocab_size, offset, where=where)
        if keys.size != count:
            raise _fail(where, f"expected {count} top-K ids, the record holds {keys.size}")
        if count > 1 and not (keys[1:] > keys[:-1]).all():
            raise _fail(where, "corrupt top-K ids: not strictly ascending within a position")
        rows = keys // self.vocab_size
        expected_rows = np.arange(self.positions)
        # Keys ascend, so a block of K keys whose first and last lie in row i lies wholly in row i.
        if not (np.array_equal(rows[::self.k], expected_rows) and np.array_equal(rows[self.k - 1::self.k],
                                                                                 expected_rows)):
            raise _fail(where, f"corrupt top-K ids: every position must hold exactly K={self.k} ids below "
                               f"V={self.vocab_size}")
        keys -= rows * self.vocab_size
        return keys.reshape(self.positions, self.k), end

    def _dequantise(self, codes: np.ndarray, log_rest: np.ndarray) -> np.ndarray:
        """[S, K] float32 log-probs: log r̂ renormalised so each row holds 1 − exp(log_rest)."""
        ratio_table, log_table = self._tables
        codes = codes.reshape(self.positions, self.k)
        row_ratio = ratio_table[codes].sum(axis=1)
        shift = np.log(-np.expm1(log_rest.astype(np.float64))) - np.log(row_ratio)
        out = log_table[codes]
        out += shift[:, None]
        return out.astype(np.float32)


def choose_value_bits(vocab_size: int, k: int, positions: int, budget: float = 1.5) -> int:
    """The largest b in [4, 8] whose ids + K·b bits per position stay ≤ budget × log2 C(V, K); 4 if none.

    "auto" value bits: spend at most 1.5× the id floor on a position where the ids leave room for it.
    """
    for bits in range(8, 3, -1):
        codec = TopkCodec(vocab_size, k, positions, bits)
        if codec.record_bits() <= budget * codec.floor_bits():
            return bits
    return 4


@dataclass(frozen=True)
class SampledCodec:
    """Sampled targets of one sample: each position's U unique drawn ids and their counts (summing to N)."""

    vocab_size: int
    draws: int
    positions: int

    def __post_init__(self) -> None:
        _check_field("vocab_size", self.vocab_size, 1, MAX_VOCAB)
        _check_field("draws", self.draws, 1, 1 << 31)
        _check_field("positions", self.positions, 1, 1 << 31)

    def floor_bits(self, unique: np.ndarray) -> np.ndarray:
        """[S] information floor per position with U unique ids: log2 C(V, U) + log2 C(N − 1, U − 1)."""
        unique = np.asarray(unique, dtype=np.int64)
        possible = np.arange(min(self.draws, self.vocab_size) + 1)
        table = np.array([_log2_binomial(self.vocab_size, u) + (_log2_binomial(self.draws - 1, u - 1) if u else 0.0)
                          for u in possible.tolist()])
        return table[unique]

    def encode(self, ids: np.ndarray, counts: np.ndarray) -> bytes:
        """Record bytes: the drawn ids' Elias–Fano block, then the counts' running sums' block."""
        ids, counts = np.asarray(ids), np.asarray(counts)
        self._check(ids, counts)
        real = ids >= 0
        rows = np.nonzero(real)[0]
        keys = rows * self.vocab_size + ids[real]
        unique = real.sum(axis=1)
        inner = np.arange(ids.shape[1]) < (unique - 1)[:, None]  # all but each row's last id
        sums = np.cumsum(counts, axis=1)
        cut_keys = np.nonzero(inner)[0] * self.draws + sums[inner]
        return (ef_encode(keys, self.positions * self.vocab_size)
                + ef_encode(cut_keys, self.positions * self.draws))

    def _check(self, ids: np.ndarray, counts: np.ndarray) -> None:
        if ids.ndim != 2 or ids.shape[0] != self.positions or ids.shape[1] < 1:
            raise CacheError(f"ids: expected shape ({self.positions}, W ≥ 1), got {ids.shape}")
        _check_shape("counts", counts, ids.shape)
        _check_integer("ids", ids)
        _check_integer("counts", counts)
        real = ids >= 0
        if not (real[:, 0].all() and (real[:, 1:] <= real[:, :-1]).all() and (ids[~real] == -1).all()):
            raise CacheError("ids: each row must hold ≥ 1 drawn ids first, then only -1 padding")
        if ids.max() >= self.vocab_size:
            raise CacheError(f"ids: expected values below vocab_size {self.vocab_size}, got {ids.max()}")
        if not (ids[:, 1:] > ids[:, :-1])[real[:, 1:]].all():
            raise CacheError("ids: each row's drawn ids must be strictly ascending")
        if not ((counts[real] >= 1).all() and (counts[~real] == 0).all()):
            raise CacheError("counts: expected ≥ 1 for each drawn id and 0 for padding")
        sums = counts.sum(axis=1)
        if not (sums == self.draws).all():
            bad = int(np.flatnonzero(sums != self.draws)[0])
            raise CacheError(f"counts: each row must sum to draws N={self.draws}; position {bad} sums to {sums[bad]}")

    def decode(self, data: bytes, where: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(ids [S, Umax] int64 padded -1, counts [S, Umax] int64 padded 0), Umax this sample's largest U."""
        buf = np.frombuffer(data, np.uint8)
        keys, offset = ef_decode(buf, self.positions * self.vocab_size, 0, where=where)
        cut_keys, end = ef_decode(buf, self.positions * self.draws, offset, where=where)
        if end != buf.size:
            raise _fail(where, f"sampled record should end after its two blocks at byte {end}, but is {buf.size} bytes")
        rows = keys // self.vocab_size
        unique = np.bincount(rows, minlength=self.positions)
        if unique.min() < 1 or (keys.size > 1 and not (keys[1:] > keys[:-1]).all()):
            raise _fail(where, "corrupt sampled ids: every position needs ≥ 1 strictly ascending drawn ids")
        cut_rows = cut_keys // self.draws
        cuts = cut_keys - cut_rows * self.draws
        if (not np.array_equal(np.bincount(cut_rows, minlength=self.positions), unique - 1)
                or (cuts < 1).any() or (cut_keys.size > 1 and not (cut_keys[1:] > cut_keys[:-1]).all())):
            raise _fail(where, f"corrupt sampled counts: each position with U ids needs U − 1 ascending running "
                               f"sums in [1, {self.draws - 1}]")
        return self._scatter(keys - rows * self.vocab_size, rows, unique, cuts)

    def _scatter(self, ids: np.ndarray, rows: np.ndarray, unique: np.ndarray,
                 cuts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[S, Umax] ids and counts from row-major ids [ΣU], their rows, U [S] and running sums [Σ(U−1)]."""
        last = np.cumsum(unique) - 1
        first = last - unique + 1
        ends = np.full(ids.size, self.draws, np.int64)
        not_last = np.ones(ids.size, bool)
        not_last[last] = False
        ends[not_last] = cuts
        starts = np.zeros(ids.size, np.int64)
        not_first = np.ones(ids.size, bool)
        not_first[first] = False
        starts[not_first] = cuts
        width = int(unique.max())
        columns = np.arange(ids.size) - first[rows]
        out_ids = np.full((self.positions, width), -1, np.int64)
        out_counts = np.zeros((self.positions, width), np.int64)
        out_ids[rows, columns] = ids
        out_counts[rows, columns] = ends - starts
        return out_ids, out_counts


def pad_width(ids: np.ndarray, counts: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sampled ids [S, U] and counts [S, U] widened to [S, width] (ids padded -1, counts 0), to stack samples."""
    if width < ids.shape[1]:
        raise CacheError(f"pad_width: width {width} is narrower than the sample's {ids.shape[1]} unique ids")
    extra = ((0, 0), (0, width - ids.shape[1]))
    return np.pad(ids, extra, constant_values=-1), np.pad(counts, extra)

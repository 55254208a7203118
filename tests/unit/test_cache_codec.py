"""The teacher-cache codec: bit packing, Elias–Fano, top-K and sampled records round-trip within their
documented bounds, any vocabulary up to 2^32 keeps its ids, and bad input fails with a CacheError."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.teacher.bits import ef_decode, ef_encode, pack_uint, unpack_uint
from pipeline.teacher.codec import SampledCodec, TopkCodec, choose_value_bits, pad_width
from pipeline.teacher.errors import CacheError

VOCABS = (1000, 50257, 151936, 262144)


@pytest.mark.parametrize("width", (1, 3, 7, 8, 13, 17, 31, 32, 33, 57))
def test_pack_unpack_round_trip(width):
    rng = np.random.default_rng(width)
    for count in (1, 7, 8, 9, 1001):
        values = rng.integers(0, 1 << width, count, dtype=np.int64)
        values[0] = (1 << width) - 1
        packed = pack_uint(values, width)
        assert packed.dtype == np.uint8 and packed.size == (count * width + 7) // 8
        assert np.array_equal(unpack_uint(packed, count, width), values)
        shifted = np.concatenate([np.full(5, 0xFF, np.uint8), packed, np.full(3, 0xFF, np.uint8)])
        assert np.array_equal(unpack_uint(shifted, count, width, byte_offset=5), values)


def test_pack_rejects_too_large_and_unpack_too_short():
    with pytest.raises(CacheError, match="2\\*\\*3"):
        pack_uint(np.array([8]), 3)
    with pytest.raises(CacheError, match="2\\*\\*3"):
        pack_uint(np.array([-1]), 3)
    packed = pack_uint(np.arange(10), 5)
    with pytest.raises(CacheError, match="expected 7 bytes"):
        unpack_uint(packed[:-1], 10, 5)
    with pytest.raises(CacheError, match="expected 7 bytes"):
        unpack_uint(packed, 10, 5, byte_offset=1)


@pytest.mark.parametrize("values, universe", [
    ([], 10), ([], 2**52), ([7], 10), ([0, 0, 3, 3, 3, 9], 10), ([2**52 - 1], 2**52),
    ([0, 5, 2**40, 2**52 - 1, 2**52 - 1], 2**52)])
def test_elias_fano_edges(values, universe):
    block = ef_encode(np.array(values, np.int64), universe)
    decoded, end = ef_decode(b"xyz" + block + b"tail", universe, offset=3)
    assert decoded.tolist() == values and end == 3 + len(block)


def test_elias_fano_random_and_truncated():
    rng = np.random.default_rng(0)
    for universe, count in ((1000, 5000), (2**52, 20000), (50257 * 64, 64 * 32)):
        values = np.sort(rng.integers(0, universe, count))
        block = ef_encode(values, universe)
        decoded, end = ef_decode(np.frombuffer(block, np.uint8), universe)
        assert np.array_equal(decoded, values) and end == len(block)
        with pytest.raises(CacheError, match="Elias–Fano"):
            ef_decode(block[:-1], universe, where="shard 3")
    with pytest.raises(CacheError, match="non-decreasing"):
        ef_encode(np.array([3, 2]), 10)
    with pytest.raises(CacheError, match="\\[0, 10\\)"):
        ef_encode(np.array([3, 10]), 10)


def _true_topk(vocab, k, positions, rng):
    """(ids, logprobs, log_rest) of the true top-K of log_softmax(3·normal logits) over the full vocab."""
    logits = rng.standard_normal((positions, vocab)) * 3
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    ids = np.sort(np.argpartition(-logp, k - 1, axis=1)[:, :k], axis=1)
    top = np.take_along_axis(logp, ids, 1)
    mass = np.exp(top).sum(1)
    log_rest = np.where(k == vocab, -np.inf, np.log1p(-np.minimum(mass, 1 - 1e-12)))
    return ids, top.astype(np.float32), log_rest.astype(np.float32)


def _synthetic_topk(vocab, k, positions, rng):
    """Sorted random ids up to 2^32 − 1 (each row's last id is the largest) and matching log-probs."""
    ids = np.sort(rng.integers(0, vocab, (positions, k)), axis=1)
    ids += np.arange(k)  # strictly ascending
    ids -= ids.max(1, keepdims=True) - (vocab - 1)  # push each row to the top of the vocabulary
    logp = rng.standard_normal((positions, k)) * 2 - 12
    return ids, logp.astype(np.float32), np.log1p(-np.exp(logp.astype(np.float64)).sum(1)).astype(np.float32)


def _check_topk(codec, ids, logprobs, log_rest):
    data = codec.encode(ids, logprobs, log_rest)
    assert data == codec.encode(ids, logprobs, log_rest) and len(data) == codec.record_bytes()
    got_ids, got_lp, got_rest = codec.decode(data)
    assert got_ids.dtype == np.int64 and got_lp.dtype == np.float32 and got_rest.dtype == np.float32
    assert np.array_equal(got_ids, ids)
    assert got_rest.tobytes() == log_rest.tobytes()
    lp, got = logprobs.astype(np.float64), got_lp.astype(np.float64)
    ratio = np.exp(lp - lp.max(1, keepdims=True))
    got_ratio = np.exp(got - got.max(1, keepdims=True))  # the top keeps code 0, so its ratio is 1
    assert np.abs(got_ratio - ratio).max() <= codec.ratio_error_bound() * (1 + 1e-5)
    stored = -np.expm1(log_rest.astype(np.float64))
    np.testing.assert_allclose(np.exp(got).sum(1), stored, rtol=1e-6)
    error = np.abs(got - lp)
    return error[ratio > 0.01].max(), error[ratio > 0.1].max()


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("k", (1, 8, 32))
def test_topk_round_trip(vocab, k):
    rng = np.random.default_rng(vocab + k)
    positions = 24 if vocab > 100000 else 48
    ids, logprobs, log_rest = _true_topk(vocab, k, positions, rng)
    for bits in (4, 8, choose_value_bits(vocab, k, positions)):
        worst, worst_large = _check_topk(TopkCodec(vocab, k, positions, bits), ids, logprobs, log_rest)
        if bits == 8:  # |Δ log r| ≤ 3·(0.5/M)/r^(1/3): 0.027 nats at r = 0.01, 0.013 at r = 0.1, plus renorm
            assert worst < 0.03, f"max |Δ log p| {worst:.4f} nats for entries with r > 0.01"
            assert worst_large < 0.02, f"max |Δ log p| {worst_large:.4f} nats for entries with r > 0.1"


def test_topk_full_vocab_has_no_rest():
    rng = np.random.default_rng(1)
    ids, logprobs, log_rest = _true_topk(1000, 1000, 4, rng)
    assert np.isneginf(log_rest).all()
    _check_topk(TopkCodec(1000, 1000, 4, 6), ids, logprobs, log_rest)


@pytest.mark.parametrize("k", (1, 8, 32))
def test_topk_keeps_ids_of_a_2_to_the_32_vocab(k):
    rng = np.random.default_rng(k)
    ids, logprobs, log_rest = _synthetic_topk(2**32, k, 64, rng)
    assert ids.max() == 2**32 - 1 and ids.min() >= 0
    _check_topk(TopkCodec(2**32, k, 64, choose_value_bits(2**32, k, 64)), ids, logprobs, log_rest)


def _draw(vocab, draws, positions, rng):
    """(ids [S, W] padded -1, counts [S, W] padded 0) of `draws` draws per position, incl. U = 1 and U = N."""
    support = min(vocab, 4 * draws)
    candidates = np.sort(np.stack([rng.choice(vocab, support, replace=False) for _ in range(positions)]), 1)
    probs = rng.dirichlet(np.full(support, 0.3), positions)
    probs[0] = np.eye(support)[0]  # one id takes every draw: U = 1
    probs[1] = np.full(support, 1 / support)
    counts = np.stack([rng.multinomial(draws, p) for p in probs])
    counts[1] = 0
    counts[1, :draws] = 1  # every draw a different id: U = N
    order = np.argsort(counts == 0, axis=1, kind="stable")
    counts = np.take_along_axis(counts, order, 1)
    ids = np.where(counts > 0, np.take_along_axis(candidates, order, 1), -1)
    width = int((counts > 0).sum(1).max())
    return ids[:, :width], counts[:, :width]


@pytest.mark.parametrize("vocab", (*VOCABS, 2**32))
def test_sampled_round_trip(vocab):
    rng = np.random.default_rng(vocab % 1000)
    ids, counts = _draw(vocab, 50, 40, rng)
    codec = SampledCodec(vocab, 50, 40)
    data = codec.encode(ids, counts)
    assert data == codec.encode(ids, counts)
    got_ids, got_counts = codec.decode(data)
    assert np.array_equal(got_ids, ids) and np.array_equal(got_counts, counts)
    unique = (ids >= 0).sum(1)
    assert unique[0] == 1 and unique[1] == 50
    floor = codec.floor_bits(unique)
    assert floor.shape == (40,) and floor[0] == pytest.approx(np.log2(vocab))
    wide_ids, wide_counts = pad_width(got_ids, got_counts, 60)
    assert wide_ids.shape == (40, 60) and (wide_ids[:, 50:] == -1).all() and (wide_counts[:, 50:] == 0).all()


def test_sampled_padding_is_trimmed_to_the_widest_row():
    codec = SampledCodec(100, 4, 2)
    ids = np.array([[5, -1, -1, -1], [1, 9, -1, -1]])
    counts = np.array([[4, 0, 0, 0], [3, 1, 0, 0]])
    got_ids, got_counts = codec.decode(codec.encode(ids, counts))
    assert got_ids.tolist() == [[5, -1], [1, 9]] and got_counts.tolist() == [[4, 0], [3, 1]]


def test_choose_value_bits_within_budget():
    for vocab, k in ((32000, 8), (128256, 32), (1000, 1000), (2**32, 1)):
        assert 4 <= choose_value_bits(vocab, k, 2048) <= 8
    for vocab, k in ((32000, 8), (128256, 32)):
        codec = TopkCodec(vocab, k, 2048, choose_value_bits(vocab, k, 2048))
        assert codec.record_bits() <= 1.5 * codec.floor_bits()
        assert codec.id_bits() < codec.floor_bits() + 2.5 * k


def test_topk_rejects_bad_fields_and_input():
    with pytest.raises(CacheError, match="k:"):
        TopkCodec(10, 11, 4, 8)
    with pytest.raises(CacheError, match="vocab_size:"):
        TopkCodec(2**32 + 1, 1, 4, 8)
    with pytest.raises(CacheError, match="value_bits:"):
        TopkCodec(10, 2, 4, 17)
    codec = TopkCodec(10, 2, 2, 8)
    logprobs, log_rest = np.log(np.full((2, 2), 0.25, np.float32)), np.log(np.full(2, 0.5, np.float32))
    with pytest.raises(CacheError, match="strictly ascending"):
        codec.encode(np.array([[1, 2], [3, 3]]), logprobs, log_rest)
    with pytest.raises(CacheError, match="\\[0, 10\\)"):
        codec.encode(np.array([[1, 2], [3, 10]]), logprobs, log_rest)
    with pytest.raises(CacheError, match="finite"):
        codec.encode(np.array([[1, 2], [3, 4]]), np.full((2, 2), np.nan, np.float32), log_rest)


def test_topk_rejects_corrupt_records():
    codec = TopkCodec(50, 4, 8, 6)
    ids, logprobs, log_rest = _true_topk(50, 4, 8, np.random.default_rng(2))
    data = codec.encode(ids, logprobs, log_rest)
    with pytest.raises(CacheError, match=f"^shard 0 key 'a': .*must be {len(data)} bytes, got {len(data) - 1}"):
        codec.decode(data[:-1], where="shard 0 key 'a'")
    keys = (np.arange(8)[:, None] * 50 + ids).reshape(-1)
    block = len(ef_encode(keys, 400))
    spare = 50 + np.setdiff1d(np.arange(50), ids[1])[0]  # position 0 gives its last id to position 1
    moved = np.sort(np.concatenate([np.delete(keys, 3), [spare]]))
    with pytest.raises(CacheError, match="^k: corrupt top-K ids: every position must hold exactly K=4"):
        codec.decode(data[:32] + ef_encode(moved, 400) + data[32 + block:], where="k")
    beyond = np.concatenate([keys[:-1], [410]])  # an id past V in the last position, same block size
    with pytest.raises(CacheError, match="Elias–Fano"):
        codec.decode(data[:32] + ef_encode(beyond, 420) + data[32 + block:])


def test_sampled_rejects_bad_input_and_corrupt_records():
    codec = SampledCodec(100, 5, 2)
    with pytest.raises(CacheError, match="sum to draws N=5"):
        codec.encode(np.array([[1, 2], [3, -1]]), np.array([[2, 2], [5, 0]]))
    with pytest.raises(CacheError, match="strictly ascending"):
        codec.encode(np.array([[2, 1], [3, -1]]), np.array([[2, 3], [5, 0]]))
    with pytest.raises(CacheError, match="below vocab_size"):
        codec.encode(np.array([[1, 100], [3, -1]]), np.array([[2, 3], [5, 0]]))
    with pytest.raises(CacheError, match="then only -1 padding"):
        codec.encode(np.array([[-1, 1], [3, -1]]), np.array([[0, 5], [5, 0]]))
    with pytest.raises(CacheError, match="≥ 1 for each drawn id"):
        codec.encode(np.array([[1, 2], [3, -1]]), np.array([[5, 0], [5, 0]]))
    data = codec.encode(np.array([[1, 2], [3, -1]]), np.array([[2, 3], [5, 0]]))
    with pytest.raises(CacheError, match="^s: sampled record should end"):
        codec.decode(data + b"\0", where="s")
    with pytest.raises(CacheError, match="^s: "):
        codec.decode(data[:-1], where="s")
    no_ids_in_row_1 = ef_encode(np.array([1, 2]), 200) + ef_encode(np.array([2]), 10)
    with pytest.raises(CacheError, match="≥ 1 strictly ascending drawn ids"):
        codec.decode(no_ids_in_row_1)
    bad_sum = ef_encode(np.array([1, 2, 103]), 200) + ef_encode(np.array([0]), 10)
    with pytest.raises(CacheError, match="running sums in \\[1, 4\\]"):
        codec.decode(bad_sum)

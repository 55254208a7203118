"""The optional per-position loss mask of a token sample (`mask.npy`): format, verification, the reader.

Shards are real webdataset .tar.gz files written by the format's ShardWriter (tests/shardmaker.py). The
expected masks and positions are built here from the hooks that wrote the shards, not read back through
the code under test.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import Source, TokenShardDataset
from pipeline.data.dataset import label_mask, loss_positions
from tests.shardmaker import make_sidecar, make_token_shards
from tokenization import format as fmt
from tokenization.verify import verify_shards

SEQ_LEN = 8


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _write(path: Path, samples: list[dict]) -> None:
    with open(path, "wb") as file, fmt.ShardWriter(file) as writer:
        for sample in samples:
            writer.write(sample)


def _read(path: Path) -> list[dict]:
    with open(path, "rb") as stream:
        return list(fmt.read_samples(stream, compressed=True, where=str(path)))


def _window(seed: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, 500, SEQ_LEN + 1).astype(np.uint16)
    return tokens, np.array([0, 3, SEQ_LEN + 1], dtype=np.int32)


def test_round_trip_with_and_without_mask(tmp_path):
    tokens, segments = _window(0)
    mask = np.array([0, 0, 0, 1, 1, 0, 1, 1], dtype=bool)
    path = tmp_path / "s.tar.gz"
    _write(path, [fmt.encode_sample("a", tokens, segments, mask), fmt.encode_sample("b", tokens, segments)])
    with_mask, without = _read(path)
    got_tokens, got_segments = fmt.decode_sample(with_mask, seq_len=SEQ_LEN, dtype=np.dtype(np.uint16), where="s")
    assert np.array_equal(got_tokens, tokens) and np.array_equal(got_segments, segments)
    got = fmt.decode_mask(with_mask, seq_len=SEQ_LEN, where="s")
    assert got.dtype == np.uint8 and got.tolist() == [0, 0, 0, 1, 1, 0, 1, 1]
    assert fmt.MASK_MEMBER not in without and fmt.decode_mask(without, seq_len=SEQ_LEN, where="s") is None
    # integer 0/1 input is stored as the same uint8
    assert fmt.encode_sample("a", tokens, segments, mask.astype(np.int64))[fmt.MASK_MEMBER] == with_mask[fmt.MASK_MEMBER]


def test_plain_webdataset_reads_a_masked_sample(tmp_path):
    import webdataset as wds

    tokens, segments = _window(1)
    mask = np.arange(SEQ_LEN) % 2
    path = tmp_path / "s.tar.gz"
    _write(path, [fmt.encode_sample("k0", tokens, segments, mask), fmt.encode_sample("k1", tokens, segments)])
    samples = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["k0", "k1"]
    assert np.array_equal(samples[0]["mask.npy"], mask.astype(np.uint8))
    assert np.array_equal(samples[0]["tokens.npy"], tokens) and "mask.npy" not in samples[1]


@pytest.mark.parametrize("mask, words", [
    (np.ones(SEQ_LEN + 1, dtype=np.uint8), "shape [8], got [9]"),
    (np.array([0, 1, 2, 1, 1, 1, 1, 1]), "values must be 0 or 1, got [0, 1, 2]"),
    (np.ones(SEQ_LEN, dtype=np.float32), "bool or integer 0/1, got dtype float32"),
])
def test_encode_refuses_a_bad_mask_by_key(mask, words):
    tokens, segments = _window(2)
    with pytest.raises(fmt.ShardFormatError, match=re.escape(f"sample 'key-7': mask ") + ".*" + re.escape(words)):
        fmt.encode_sample("key-7", tokens, segments, mask)


@pytest.mark.parametrize("stored, words", [
    (np.ones(SEQ_LEN - 1, dtype=np.uint8), "mask.npy is uint8[7], expected uint8[8]"),
    (np.array([0, 1, 2, 1, 1, 1, 1, 1], dtype=np.uint8), "mask.npy must hold 0 and 1 only, got [0, 1, 2]"),
    (np.ones(SEQ_LEN, dtype=np.float32), "mask.npy is float32[8], expected uint8[8]"),
])
def test_decode_refuses_a_bad_mask_naming_where_and_key(stored, words):
    tokens, segments = _window(3)
    sample = fmt.encode_sample("key-9", tokens, segments) | {fmt.MASK_MEMBER: _npy(stored)}
    with pytest.raises(fmt.ShardFormatError, match=re.escape(f"shard x.tar.gz: sample 'key-9': {words}")):
        fmt.decode_mask(sample, seq_len=SEQ_LEN, where="shard x.tar.gz")
    with pytest.raises(fmt.ShardFormatError, match="shard x.tar.gz: sample 'key-9' has an undecodable member"):
        fmt.decode_mask(sample | {fmt.MASK_MEMBER: b"junk"}, seq_len=SEQ_LEN, where="shard x.tar.gz")


def _mask(shard: int, offset: int):
    """Shard 0: no mask on even offsets; odd offsets zero their first (offset % 5) positions. Shard 1: no masks."""
    if shard == 1 or offset % 2 == 0:
        return None
    return np.arange(SEQ_LEN) >= offset % 5


def _end(shard: int, offset: int) -> int:
    return SEQ_LEN + 1 - offset % 4  # bestfit-style padding on 3 samples of 4


def test_verify_accepts_masks_and_lists_a_bad_one(tmp_path):
    make_token_shards(tmp_path / "good", [5, 3], seq_len=SEQ_LEN, mask_fn=_mask)
    assert verify_shards(tmp_path / "good") == []
    folder = tmp_path / "bad"
    folder.mkdir()
    manifest = make_token_shards(folder, [2], seq_len=SEQ_LEN)
    path = folder / manifest.shards[0].name
    samples = _read(path)
    samples[1][fmt.MASK_MEMBER] = _npy(np.full(SEQ_LEN, 3, dtype=np.uint8))
    _write(path, samples)
    problems = verify_shards(folder)
    assert f"{path}: sample 'shard-000000-000001': mask.npy must hold 0 and 1 only, got [3]" in problems
    assert not any("unexpected members" in p for p in problems)


@pytest.fixture(scope="module")
def masked(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("masked")
    manifest = make_token_shards(folder / "tokens", [5, 3], seq_len=SEQ_LEN, mask_fn=_mask, end_fn=_end)
    make_sidecar(folder / "side", manifest)
    return folder


def _expected(key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the row's loss mask as the batch should carry it, the positions that count) from the writing hooks."""
    shard, offset = (int(part) for part in key.split("-")[1:])
    mask = _mask(shard, offset)
    row = torch.ones(SEQ_LEN, dtype=torch.bool) if mask is None else torch.from_numpy(mask)
    real = torch.arange(1, SEQ_LEN + 1) < _end(shard, offset)
    return row, row & real


def test_dataset_yields_loss_mask_only_when_a_sample_has_one(masked):
    data = TokenShardDataset(Source(str(masked / "tokens"), sidecars={"side": str(masked / "side")}),
                             micro_batch=2, dp_rank=0, dp_size=1, seed=0, shuffle=False)
    with_mask = without = 0
    for step in range(data.steps_per_epoch):
        batch = data.batch(step)
        rows = [_expected(key) for key in batch["keys"]]
        has = any(_mask(*(int(p) for p in key.split("-")[1:])) is not None for key in batch["keys"])
        assert ("loss_mask" in batch) == has, batch["keys"]
        positions = loss_positions(batch, SEQ_LEN)
        assert positions.dtype == torch.bool and positions.shape == (2, SEQ_LEN)
        assert torch.equal(positions, torch.stack([counted for _, counted in rows])), batch["keys"]
        if has:
            with_mask += 1
            assert batch["loss_mask"].dtype == torch.bool
            assert torch.equal(batch["loss_mask"], torch.stack([row for row, _ in rows])), batch["keys"]
        else:
            without += 1
            assert torch.equal(positions, label_mask(batch["segments"], SEQ_LEN))
        # the sidecar still joins sample by sample: its member names the sample's (shard, offset)
        for key, members in zip(batch["keys"], batch["sidecars"]):
            joined = np.load(io.BytesIO(members["side.target.npy"])).tolist()
            assert joined == [int(part) for part in key.split("-")[1:]]
    assert with_mask and without, "the data should give batches of both kinds"


def test_loss_positions_excludes_padding_where_the_mask_says_one():
    """A mask of all ones on a padded row still counts only real labels."""
    segments = torch.tensor([[0, 4, -1], [0, 2, 9]])
    batch = {"segments": segments, "loss_mask": torch.tensor([[True] * SEQ_LEN, [False, True] * 4])}
    got = loss_positions(batch, SEQ_LEN)
    assert got[0].tolist() == [True, True, True] + [False] * 5
    assert got[1].tolist() == [False, True] * 4

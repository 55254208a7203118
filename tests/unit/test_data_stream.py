"""The reader's stream: distribution over DP ranks, order, exact resumption, workers, blending."""
from __future__ import annotations

import itertools
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.data import ResumableLoader, Source, TokenShardDataset
from pipeline.data import dataset as dataset_module
from tests.shardmaker import make_token_shards

REPO = Path(__file__).resolve().parents[2]
SIZES = [7, 13, 5, 20, 1, 9]  # unequal on purpose: 55 samples


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    make_token_shards(root / "a", SIZES, seed=1)
    make_token_shards(root / "b", [11, 4, 6], seed=2, prefix="other")
    return root


def build(folders, dp_rank=0, dp_size=1, seed=3, micro_batch=2, blend=False, **kw):
    sources = [Source(str(folders / "a"), 3.0), Source(str(folders / "b"), 1.0)] if blend else str(folders / "a")
    return TokenShardDataset(sources, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
                             shuffle_window=4, blend_period=8, **kw)


def take(iterable, count):
    return list(itertools.islice(iterable, count))


def same(a, b) -> bool:
    return a["keys"] == b["keys"] and a["step"] == b["step"] and torch.equal(a["tokens"], b["tokens"]) \
        and torch.equal(a["segments"], b["segments"])


CASES = [(dp, rank, blend) for dp in (1, 2, 4) for rank in sorted({0, dp - 1}) for blend in (False, True)]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_matches_uninterrupted_stream(folders, workers):
    k, m = 5, 9  # m crosses an epoch boundary for dp=4 (6 steps per epoch)
    for dp, rank, blend in CASES:
        reference = take(build(folders, rank, dp, blend=blend), k + m)
        loader = ResumableLoader(build(folders, rank, dp, blend=blend), num_workers=workers)
        first = take(loader, k)
        state = loader.state_dict()
        restored = ResumableLoader(build(folders, rank, dp, blend=blend), num_workers=workers)
        restored.load_state_dict(state)
        rest = take(restored, m)
        assert [b["step"] for b in first + rest] == list(range(k + m)), (dp, rank, blend)
        assert all(same(x, y) for x, y in zip(first + rest, reference)), (dp, rank, blend, workers)


def test_resume_in_a_fresh_process(folders, tmp_path):
    k, m = 4, 6
    cases = []
    for dp, rank, blend in CASES:
        loader = ResumableLoader(build(folders, rank, dp, blend=blend), num_workers=0)
        take(loader, k)
        cases.append({"dp": dp, "rank": rank, "blend": blend, "state": loader.state_dict()})
    torch.save({"folders": str(folders), "cases": cases, "m": m}, tmp_path / "in.pt")
    code = ("import sys; from tests.unit.test_data_stream import resume_child; "
            "resume_child(sys.argv[1], sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   cwd=REPO, check=True, timeout=120)
    results = torch.load(tmp_path / "out.pt")
    for case, batches in zip(cases, results):
        reference = take(build(folders, case["rank"], case["dp"], blend=case["blend"]), k + m)[k:]
        assert all(same(x, y) for x, y in zip(batches, reference)) and len(batches) == m, case


def resume_child(inp: str, out: str) -> None:
    """Runs in a fresh interpreter: restore each saved state, read m batches (2 workers), save them."""
    spec = torch.load(inp)
    results = []
    for case in spec["cases"]:
        loader = ResumableLoader(build(Path(spec["folders"]), case["rank"], case["dp"], blend=case["blend"]),
                                 num_workers=2)
        loader.load_state_dict(case["state"])
        results.append(take(loader, spec["m"]))
    torch.save(results, out)


def test_resume_reads_at_most_one_window(folders, monkeypatch):
    """A restore far into the stream opens the shard at the position; it never re-reads consumed samples."""
    taken = Counter()
    original = dataset_module.ShardReader.take

    def counting(self, count):
        taken["samples"] += count
        return original(self, count)

    monkeypatch.setattr(dataset_module.ShardReader, "take", counting)
    for far in (3, 300, 30000):
        taken.clear()
        dataset = build(folders)
        dataset.load_state_dict(dataset.state_dict(next_step=far))
        batch = next(iter(dataset))
        assert batch["step"] == far
        assert taken["samples"] <= 2 * 4, (far, taken)  # ≤ the windows its 2 samples fall in


def test_ranks_get_equal_disjoint_samples(folders):
    total = sum(SIZES)
    for dp, micro_batch in [(1, 2), (2, 3), (4, 2), (3, 5)]:
        per_rank = [list(build(folders, r, dp, micro_batch=micro_batch, max_epochs=1)) for r in range(dp)]
        steps = total // (dp * micro_batch)
        assert [len(batches) for batches in per_rank] == [steps] * dp
        keys = [k for batches in per_rank for b in batches for k in b["keys"]]
        assert len(keys) == len(set(keys)) == steps * dp * micro_batch
        assert all(b["tokens"].shape == (micro_batch, 9) and b["tokens"].dtype == torch.int64
                   for batches in per_rank for b in batches)
    # without shuffling the dropped remainder is the tail of the shard order
    unshuffled = [list(build(folders, r, 2, micro_batch=3, shuffle=False, max_epochs=1)) for r in range(2)]
    keys = sorted(k for batches in unshuffled for b in batches for k in b["keys"])
    every = sorted(f"shard-{s:06d}-{o:06d}" for s, n in enumerate(SIZES) for o in range(n))
    assert keys == every[: 2 * 3 * (total // 6)]


def test_order_is_a_function_of_seed_and_epoch(folders):
    def epoch_keys(seed, epoch, **kw):
        dataset = build(folders, seed=seed, micro_batch=1, **kw)
        start = epoch * dataset.steps_per_epoch
        dataset.load_state_dict(dataset.state_dict(next_step=start))
        return [b["keys"][0] for b in take(dataset, dataset.steps_per_epoch)]

    epoch0, epoch1 = epoch_keys(3, 0), epoch_keys(3, 1)
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == sum(SIZES)
    assert epoch0 != epoch1 and epoch0 != epoch_keys(4, 0)
    assert epoch0 == epoch_keys(3, 0)
    # TP ranks of one DP group build the same dataset: identical batches; worker count changes nothing
    tp_a, tp_b = take(build(folders, 1, 2), 6), take(ResumableLoader(build(folders, 1, 2), num_workers=2), 6)
    assert all(same(x, y) for x, y in zip(tp_a, tp_b))


def test_blend_proportions_are_deterministic(folders):
    dataset = build(folders, blend=True, micro_batch=4)
    keys = [k for b in take(dataset, 60) for k in b["keys"]]
    share = sum(k.startswith("shard") for k in keys) / len(keys)
    assert abs(share - 0.75) <= 1 / 8 + 1e-9
    again = [k for b in take(build(folders, blend=True, micro_batch=4), 60) for k in b["keys"]]
    assert keys == again


def test_refuses_a_state_of_another_stream(folders, tmp_path):
    state = build(folders, 0, 2).state_dict(next_step=3)
    with pytest.raises(ValueError, match="dp_size: saved 2, now 4"):
        build(folders, 0, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed: saved 3, now 9"):
        build(folders, 0, 2, seed=9).load_state_dict(state)
    make_token_shards(tmp_path / "c", SIZES, seed=5)
    other = TokenShardDataset(str(tmp_path / "c"), micro_batch=2, dp_rank=0, dp_size=2, seed=3, shuffle_window=4,
                              blend_period=8)
    with pytest.raises(ValueError, match="fingerprint: saved"):
        other.load_state_dict(state)
    build(folders, 1, 2).load_state_dict(state)  # another rank of the same stream is fine


def test_url_reads_like_a_local_folder(folders):
    local = take(build(folders, 1, 2), 8)
    url = TokenShardDataset(f"file://{folders / 'a'}", micro_batch=2, dp_rank=1, dp_size=2, seed=3,
                            shuffle_window=4, blend_period=8)
    url.load_state_dict(url.state_dict(next_step=3))  # non-seekable path: skips by reading, not decoding
    assert all(same(x, y) for x, y in zip(local[3:], take(url, 5)))

"""`distill prune --tp 2` against the same prune at TP 1, on a tiny llama_kv4 teacher (8 query, 4 kv heads).

One spawn of world 2 prunes the Hugging Face teacher at tp 2, then a TP-2 checkpoint of it at tp 2 (read as
split), and checks that `--tp 1` in a world of 2 is refused by name. The parent prunes the same folder at TP 1
in-process. Each TP-2 run must keep the same layers, kv groups, query heads, MLP and hidden channels, write the
same tensors to the bit, give the same report on both ranks, and scores within 1e-5 relative (plus 1e-6 for
the report's six decimals); the vocabulary (300, padded to 512) leaves rank 1 a slice that is mostly padding.
"""
from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed
from tests.modelmaker import make_hf_model, read_safetensors
from tests.shardmaker import make_token_shards

TARGETS = dict(samples=6, num_layers=1, hidden_size=48, intermediate_size=100, num_heads=4, depth="importance")
KEPT = ("kept_layers", "kept_kv_heads", "kept_query_heads", "kept_hidden_channels", "kept_mlp_channels")
SCORES = ("layer_importance_kl", "hidden_channel_scores")
PER_LAYER_SCORES = ("kv_group_scores", "mlp_channel_scores")


def _prune_tp2(rank: int, world: int, folder) -> dict:
    from pipeline.prune.errors import PruneError
    from pipeline.prune.run import prune

    common = dict(tokens=folder / "tokens", **TARGETS)
    out = {"hf": prune(teacher=folder / "t", out=folder / "s_hf", tp=2, **common),
           "ckpt": prune(teacher=folder / "t_tp2", out=folder / "s_ckpt", tp=2, **common)}
    try:
        prune(teacher=folder / "t", out=folder / "s_bad", tp=1, **common)
    except PruneError as error:
        out["refused"] = str(error)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from pipeline.model.tp_checkpoint import hf_to_tp_checkpoint
    from pipeline.prune.run import prune

    folder = tmp_path_factory.mktemp("prune_tp")
    make_token_shards(folder / "tokens", [4, 4], seq_len=16, vocab_size=300)
    make_hf_model("llama_kv4", folder / "t", seed=3)
    hf_to_tp_checkpoint(folder / "t", folder / "t_tp2", 2)
    reference = prune(teacher=folder / "t", tokens=folder / "tokens", out=folder / "s_tp1", **TARGETS)
    return folder, reference, run_distributed(_prune_tp2, 2, folder)


def _without_time(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "calibration_seconds"}


@pytest.mark.parametrize("which", ["hf", "ckpt"])
def test_tp2_keeps_and_writes_what_tp1_does(runs, which):
    folder, reference, ranks = runs
    report = ranks[0][which]
    assert _without_time(ranks[1][which]) == _without_time(report)
    assert report["tp"] == 2 and reference["tp"] == 1
    for key in KEPT:
        assert report[key] == reference[key], key
    assert len(report["kept_mlp_channels"][0]) == 100 and len(report["kept_kv_heads"][0]) == 2
    for key in SCORES:
        assert report[key] == pytest.approx(reference[key], rel=1e-5, abs=1e-6), key
    for key in PER_LAYER_SCORES:
        assert len(report[key]) == len(reference[key]) == 1, key
        for got, want in zip(report[key], reference[key]):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), key
    for key in ("teacher_loss", "student_loss"):
        assert report[key] == pytest.approx(reference[key], rel=1e-5), key
    ours, theirs = read_safetensors(folder / f"s_{which}"), read_safetensors(folder / "s_tp1")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_tp_must_be_the_world_size(runs):
    _, _, ranks = runs
    assert all("--tp 1: expected the number of processes (2)" in rank["refused"] for rank in ranks)
    assert not (runs[0] / "s_bad").exists()

"""The intermediate-state loss at TP 2 and DP 2 equals TP 1 × DP 1: same losses, same learned map, same student.

A width-32 student learns from an online width-64 teacher (kl + 0.5 × the cosine intermediate-state loss on
the embedding and the last layer, so the map and a pair without one are both exercised) for 4 AdamW steps
at lr 0.01, one global batch of 4 samples per step: DP 1 × grad_accumulation 2, TP 2 (two processes) × 2, and
DP 2 × 1 (ZeRO-3 partitions the map over the two ranks). Every TP rank holds the full hidden states (sequence
parallelism is off) and the replicated map, so each computes the same loss; the step's losses must agree
within 1e-5, the map (on both TP 2 ranks) must equal DP 1's within 1e-4, and the exported students within
the tolerance the trainer's own TP check uses (tests/dist/test_train_equivalence.py).
"""
from __future__ import annotations

import pytest

from pipeline.online.hidden import MAP_NAME
from tests.e2e.test_train_hidden import checkpoint_state, hidden_overrides
from tests.harness import run_distributed
from tests.modelmaker import make_hf_model
from tests.shardmaker import make_token_shards
from tests.trainkit import final_weights, losses, train_config


def _train(rank: int, world: int, runs: list) -> list:
    from pipeline.train.run import run_training

    return [run_training(train_config(overrides)) for overrides in runs]


@pytest.mark.dist
def test_tp2_and_dp2_match_tp1(tmp_path):
    make_token_shards(tmp_path / "tokens", [24], seq_len=16, vocab_size=300, seed=0)
    make_hf_model("llama_gqa", tmp_path / "teacher", seed=2)
    common = dict(grad_accumulation=2, teacher__hidden_loss="cosine", teacher__student_layers="[0,2]",
                  teacher__teacher_layers="[0,2]", compute__document_masking="true")
    tp1 = hidden_overrides(tmp_path, "tp1", **common)
    tp2 = hidden_overrides(tmp_path, "tp2", tp=2, **common)
    assert run_distributed(_train, 1, [tp1]) == [[0]]
    dp2 = hidden_overrides(tmp_path, "dp2", **{**common, "grad_accumulation": 1})
    assert run_distributed(_train, 2, [tp2, dp2]) == [[0, 0], [0, 0]]
    for run in ("tp2", "dp2"):
        for tag in ("train/loss", "train/hidden_loss", "train/kd_loss"):
            want, have = losses(tmp_path / "tp1", tag), losses(tmp_path / run, tag)
            assert sorted(want) == [1, 2, 3, 4] and sorted(have) == sorted(want), tag
            for step, value in want.items():
                assert have[step] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{run} {tag} step {step}"
    key = f"{MAP_NAME}.weight"
    reference = checkpoint_state(tmp_path / "tp1")[key]
    for run, tp_rank in (("tp2", 0), ("tp2", 1), ("dp2", 0)):
        assert (checkpoint_state(tmp_path / run, tp_rank)[key] - reference).abs().max() <= 1e-4, (run, tp_rank)
    want = final_weights(tmp_path / "tp1", tmp_path / "tp1_hf")
    for run in ("tp2", "dp2"):
        have = final_weights(tmp_path / run, tmp_path / f"{run}_hf")
        assert have.keys() == want.keys()
        for name, tensor in want.items():
            diff = (have[name] - tensor).abs()
            assert diff.max() <= 1e-3, f"{run} {name}: differs by {float(diff.max()):.2e}"
            assert (diff <= 1e-5).float().mean() >= 0.999, f"{run} {name}: too many entries differ by > 1e-5"

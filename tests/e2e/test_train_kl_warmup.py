"""loss.kl_warmup_steps: forward KL for the first steps, then the configured divergence.

Two runs from the same seed on the same data and cache: js after 3 steps of KL warm-up, and plain kl. Their
first 3 steps are the same computation, so the logged losses agree exactly; step 4 starts from the same weights
on the same batch, so the label CE agrees while the divergence is JS (never above ln 2) instead of KL.
A warm-up with the label-only loss is refused by name.
"""
from __future__ import annotations

import math

import pytest

from pipeline.config import ConfigError
from tests.harness import run_distributed
from tests.shardmaker import make_token_shards
from tests.trainkit import losses, student_overrides, teacher_cache, train_config

WARM = 3


def _train(rank: int, world: int, overrides: list) -> int:
    from pipeline.train.run import run_training

    return run_training(train_config(overrides))


def test_warmup_trains_kl_then_switches_to_the_divergence(tmp_path):
    tokens = tmp_path / "tokens"
    make_token_shards(tokens, [24], seq_len=16, vocab_size=300, seed=0)
    cache = teacher_cache(tmp_path, tokens)
    warm = student_overrides(tmp_path / "warm", tokens, cache, steps=6) + [
        "loss.divergence=js", f"loss.kl_warmup_steps={WARM}"]
    plain = student_overrides(tmp_path / "kl", tokens, cache, steps=6)
    assert run_distributed(_train, 1, warm) == [0] and run_distributed(_train, 1, plain) == [0]
    warm_kd, plain_kd = losses(tmp_path / "warm", "train/kd_loss"), losses(tmp_path / "kl", "train/kd_loss")
    assert sorted(warm_kd) == sorted(plain_kd) == list(range(1, 7))
    assert [warm_kd[s] for s in range(1, WARM + 1)] == [plain_kd[s] for s in range(1, WARM + 1)]
    assert [losses(tmp_path / "warm")[s] for s in range(1, WARM + 1)] == \
        [losses(tmp_path / "kl")[s] for s in range(1, WARM + 1)]
    # step WARM + 1 starts from the same weights on the same batch: the label CE agrees, the divergence does not
    first = WARM + 1
    warm_ce, plain_ce = losses(tmp_path / "warm", "train/ce_loss"), losses(tmp_path / "kl", "train/ce_loss")
    assert warm_ce[first] == plain_ce[first]
    assert warm_kd[first] != plain_kd[first]
    assert all(warm_kd[s] <= math.log(2) for s in range(first, 7)), warm_kd  # JS never exceeds ln 2


def test_warmup_needs_a_teacher(tmp_path):
    with pytest.raises(ConfigError, match="kl_warmup_steps"):
        train_config(student_overrides(tmp_path / "run", tmp_path) + ["loss.kl_warmup_steps=2"])

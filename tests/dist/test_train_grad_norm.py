"""The global gradient norm (train/grad_norm, and what gradient clipping divides by) is the same at TP 2 as at TP 1.

DeepSpeed's ZeRO-3 norm adds a parameter's gradient on every TP rank only when the parameter is marked
`tensor_model_parallel`, else on TP rank 0 alone. The student's TP-split weights (fused QKV, projections, MLP,
vocab-parallel embedding and output layer) must carry that mark, and the replicated RMSNorm weights must not;
a missing mark counts only TP rank 0's slice (a norm of 1.22 instead of 1.64 on this config's first step).

One global batch of 2 samples (micro-batch 1 × grad_accumulation 2) at TP 1 (one process) and TP 2 (two gloo
processes, DP 1), with clipping at 0.05, below every step's norm, so it scales every update. The norms agree
within rel 1e-5 at every step (summation order only), and so do the losses: a wrong norm clips by another
factor and the losses part by about 1e-4 from step 3 on.
"""
from __future__ import annotations

import pytest

from tests.harness import run_distributed
from tests.shardmaker import make_token_shards
from tests.trainkit import losses, student_overrides, train_config

STEPS, CLIP = 4, 0.05


def _train(rank: int, world: int, overrides: list[str]) -> int:
    from pipeline.train.run import run_training

    return run_training(train_config(overrides))


@pytest.mark.dist
def test_tp2_grad_norm_and_clipped_losses_match_tp1(tmp_path):
    tokens = tmp_path / "tokens"
    make_token_shards(tokens, [10, 10], seq_len=16, vocab_size=300, seed=0)
    runs = {tp: student_overrides(tmp_path / f"tp{tp}", tokens, steps=STEPS, micro_batch=1, grad_accumulation=2,
                                  tp=tp, optim__grad_clip=CLIP) for tp in (1, 2)}
    assert run_distributed(_train, 1, runs[1]) == [0]
    assert run_distributed(_train, 2, runs[2]) == [0, 0]
    norms = {tp: losses(tmp_path / f"tp{tp}", "train/grad_norm") for tp in runs}
    curves = {tp: losses(tmp_path / f"tp{tp}") for tp in runs}
    assert sorted(norms[1]) == sorted(norms[2]) == sorted(curves[1]) == sorted(curves[2]) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert norms[1][step] > CLIP, f"step {step}: norm {norms[1][step]} does not reach the clip, nothing is clipped"
        assert norms[2][step] == pytest.approx(norms[1][step], rel=1e-5), f"grad_norm at step {step}"
        assert curves[2][step] == pytest.approx(curves[1][step], rel=1e-5, abs=1e-6), f"loss at step {step}"

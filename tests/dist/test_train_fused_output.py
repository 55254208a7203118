"""`loss.fused_output: true` trains exactly as the unfused run does, at TP 1 and at TP 2.

Two cases, each run unfused and fused for 5 steps (micro-batch 2 × grad_accumulation 2) with the final
evaluation (CE and KL on a held-out cache) on: a top-K teacher cache with forward KL mixed with some CE and an
untied output layer, and hard-label CE with tied embeddings (the output layer uses the embedding's weight,
whose gradient then comes from both uses). The TP 1 runs share one process, the TP 2 runs two gloo processes.
Each process counts its `distill_linear_loss` calls, so a fused run that silently computed logits fails.

Fused and unfused differ only in summation order (the output layer's products are accumulated per block), so
the losses and the eval figures agree within 1e-5, and the final parameters as closely as the TP 2 equivalence
test allows (most within 1e-5; Adam's g/√v magnifies fp32 rounding in rarely-seen embedding rows).
A micro-batch of 2 matters: megatron's hidden states are [S, B, H], so the loss sees a transposed view, and
at TP 2 a hidden-state gradient not laid out as that view was silently left unreduced by megatron's
all-reduce (micro-batch 1 hides it, the transpose being contiguous then).
"""
from __future__ import annotations

import pytest

from pipeline.model.init import initial_tensor
from tests.harness import run_distributed
from tests.shardmaker import make_token_shards
from tests.trainkit import final_weights, losses, student_overrides, teacher_cache, train_config

STEPS = 5
MOVED = "model.layers.0.mlp.down_proj.weight"


def _train(rank: int, world: int, runs: list) -> list:
    """(exit code, distill_linear_loss calls) of each run, in order."""
    from pipeline.train import fused_step
    from pipeline.train.run import run_training

    counted, calls = fused_step.distill_linear_loss, []

    def counting(*args, **kwargs):
        calls.append(1)
        return counted(*args, **kwargs)

    fused_step.distill_linear_loss = counting
    out = []
    for overrides in runs:
        calls.clear()
        out.append((run_training(train_config(overrides)), len(calls)))
    return out


@pytest.mark.dist
def test_fused_output_trains_as_unfused_at_tp1_and_tp2(tmp_path):
    tokens = tmp_path / "tokens"
    make_token_shards(tokens, [20, 20], seq_len=16, vocab_size=300, seed=0)
    cache = teacher_cache(tmp_path, tokens)
    evaluation = dict(data__eval_tokens=tokens, data__eval_teacher_cache=cache, eval__batches=1)
    cases = {"sparse": dict(cache=cache, loss__ce_weight=0.2),
             "ce_tied": dict(model__tie_embeddings="true")}
    names = [(case, tp, fused) for tp in (1, 2) for case in cases for fused in (False, True)]
    runs = {name: student_overrides(tmp_path / "_".join(map(str, name)), tokens, steps=STEPS, micro_batch=2,
                                    grad_accumulation=2, tp=name[1], loss__fused_output=str(name[2]).lower(),
                                    **evaluation, **cases[name[0]]) for name in names}
    by_tp = {tp: [name for name in names if name[1] == tp] for tp in (1, 2)}
    results = {1: run_distributed(_train, 1, [runs[n] for n in by_tp[1]])[0]}
    results[2] = run_distributed(_train, 2, [runs[n] for n in by_tp[2]])[0]  # rank 0 reports for both
    for tp, names_tp in by_tp.items():
        for name, (code, fused_calls) in zip(names_tp, results[tp]):
            assert code == 0, name
            # one call per training micro-batch; the final eval's one batch makes two (ce, kl on its cache)
            expected = STEPS * 2 + 2 if name[2] else 0
            assert fused_calls == expected, f"{name}: {fused_calls} distill_linear_loss calls, expected {expected}"
    for case, tp, _ in [n for n in names if not n[2]]:
        plain, fused = (tmp_path / f"{case}_{tp}_{flag}" for flag in (False, True))
        for tag in ("train/loss", "train/kd_loss", "train/ce_loss", "eval/loss", "eval/divergence"):
            want, got = losses(plain, tag), losses(fused, tag)
            assert sorted(got) == sorted(want) and want, f"{case} tp{tp} {tag}: steps {sorted(got)}"
            for step, value in want.items():
                assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{case} tp{tp} {tag} step {step}"
        weights = [final_weights(run, tmp_path / f"{run.name}_hf") for run in (plain, fused)]
        start = initial_tensor(MOVED, (64, 128), train_config(runs[(case, tp, False)]).model, 1234)
        assert (weights[0][MOVED] - start).abs().max() > 1e-3, f"{case} tp{tp}: training did not move"
        assert weights[0].keys() == weights[1].keys()
        assert ("lm_head.weight" in weights[0]) == (case != "ce_tied")
        for key, tensor in weights[0].items():
            diff = (weights[1][key] - tensor).abs()
            assert diff.max() <= 1e-3, f"{case} tp{tp} {key}: differs by {float(diff.max()):.2e}"
            assert (diff <= 1e-5).float().mean() >= 0.999, f"{case} tp{tp} {key}: too many entries differ by > 1e-5"

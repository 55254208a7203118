"""distill_linear_loss over tp = 2 and 4 gloo ranks against distill_loss on the whole logits in one process.

One spawn per world size runs every case; each rank holds the full hidden states and its slice of
the output weight (the last one with padding rows), and returns its loss, metrics and both
gradients. The parent sums the hidden-state gradients over ranks (what a column-parallel layer's
input region does), concatenates the weight slices' gradients, and compares them with autograd
through the unfused loss on `hidden @ weight.T` at tp = 1.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.losses import distill_linear_loss, distill_loss
from tests.harness import run_distributed
from tests.reference import all_cases, full_inputs, linear_inputs, loss_kwargs, shard_targets

pytestmark = pytest.mark.dist
CASES = all_cases()
RTOL = 1e-5


def run_rank(case, group, tp_rank: int, tp: int) -> dict:
    inputs = full_inputs(case)
    hidden, weight = linear_inputs(case)
    width = case.padded_vocab // tp
    lo, hi = tp_rank * width, (tp_rank + 1) * width
    h, w = hidden.requires_grad_(), weight[lo:hi].clone().requires_grad_()
    out = distill_linear_loss(h, w, shard_targets(case, inputs, lo, hi),
                              **loss_kwargs(case, inputs, group=group, chunk_size=5))
    out.loss.backward()
    return {"loss": out.loss.item(), "kd": out.kd.item(), "ce": out.ce.item(),
            "top1": out.metrics["top1_agreement"].item(), "grad_hidden": h.grad, "grad_weight": w.grad}


def tp_worker(rank: int, world: int, tp: int) -> dict:
    groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]
    return {case.name: run_rank(case, groups[rank // tp], rank % tp, tp) for case in CASES}


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def tp_results(request):
    tp = request.param
    return tp, run_distributed(tp_worker, tp, tp)


def unfused(case) -> dict:
    inputs = full_inputs(case)
    hidden, weight = (t.requires_grad_() for t in linear_inputs(case))
    out = distill_loss(hidden @ weight.T, shard_targets(case, inputs, 0, case.padded_vocab),
                       **loss_kwargs(case, inputs))
    out.loss.backward()
    return {"loss": out.loss.item(), "kd": out.kd.item(), "ce": out.ce.item(),
            "top1": out.metrics["top1_agreement"].item(), "grad_hidden": hidden.grad, "grad_weight": weight.grad}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_unfused_single_process(tp_results, case):
    _, results = tp_results
    per_rank = [r[case.name] for r in results]
    ref = unfused(case)
    for r in per_rank:
        for key in ("loss", "kd", "ce", "top1"):
            assert r[key] == per_rank[0][key], f"every TP rank must return the same {key}"
            assert r[key] == pytest.approx(ref[key], rel=RTOL, abs=1e-7), key
    grads = {"grad_hidden": sum(r["grad_hidden"] for r in per_rank),
             "grad_weight": torch.cat([r["grad_weight"] for r in per_rank])}
    for key, got in grads.items():
        torch.testing.assert_close(got, ref[key], rtol=RTOL, atol=RTOL * ref[key].abs().max().item(), msg=key)
    assert grads["grad_weight"][case.vocab:].abs().max() == 0, "padding rows of the weight get no gradient"

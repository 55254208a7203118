"""distill_loss over tp = 2 and 4 gloo ranks against the float64 single-process reference.

One spawn per world size runs every case; each rank returns its loss, metrics and gradient shard,
and the parent reassembles the gradient and compares it with autograd on the gathered vocabulary.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.losses import distill_loss
from tests.harness import run_distributed
from tests.reference import all_cases, full_inputs, reference_loss, shard_targets, uses_labels

pytestmark = pytest.mark.dist
CASES = all_cases()


def run_case(case, group, tp_rank: int, tp: int, chunk_size=None) -> dict:
    """This rank's part of one case: its loss, detached parts and gradient shard."""
    inputs = full_inputs(case)
    width = case.padded_vocab // tp
    lo, hi = tp_rank * width, (tp_rank + 1) * width
    student = inputs["student"][:, lo:hi].float().requires_grad_()
    labels = inputs["labels"] if uses_labels(case) else None
    out = distill_loss(student, shard_targets(case, inputs, lo, hi), divergence=case.divergence, tp_group=group,
                       temperature=case.temperature, labels=labels, loss_mask=inputs["mask"],
                       ce_weight=case.ce_weight, vocab_size=case.vocab, chunk_size=chunk_size, **dict(case.params))
    out.loss.backward()
    return {"loss": out.loss.item(), "kd": out.kd.item(), "ce": out.ce.item(),
            "top1": out.metrics["top1_agreement"].item(), "grad": student.grad}


def tp_worker(rank: int, world: int, tp: int) -> dict:
    groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]
    group = groups[rank // tp]
    return {case.name: run_case(case, group, rank % tp, tp, chunk_size=5) for case in CASES}


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def tp_results(request):
    tp = request.param
    return tp, run_distributed(tp_worker, tp, tp)


def assert_matches_reference(case, per_rank: list[dict]) -> None:
    inputs = full_inputs(case)
    student = inputs["student"].clone().requires_grad_()
    ref = reference_loss(case, inputs, student)
    ref["loss"].backward()
    grad = torch.cat([r["grad"] for r in per_rank], dim=-1).double()
    for r in per_rank:
        assert r["loss"] == per_rank[0]["loss"], "every TP rank must return the same loss"
        torch.testing.assert_close(torch.tensor(r["loss"], dtype=torch.float64), ref["loss"].detach(), rtol=1e-5, atol=1e-7)
        if uses_labels(case):
            torch.testing.assert_close(torch.tensor(r["ce"], dtype=torch.float64), ref["ce"], rtol=1e-5, atol=1e-7)
    scale = student.grad.abs().max().item()
    torch.testing.assert_close(grad, student.grad, rtol=1e-5, atol=1e-5 * scale)
    assert grad[:, case.vocab:].abs().max() == 0, "padded vocabulary entries must get no gradient"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_float64_reference(tp_results, case):
    _, results = tp_results
    assert_matches_reference(case, [r[case.name] for r in results])

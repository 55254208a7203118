"""Hard-label CE from distill_loss equals megatron-core's vocab_parallel_cross_entropy (tp = 1, 2, 4)."""
from __future__ import annotations

import pytest
import torch

from pipeline.losses import distill_loss
from pipeline.parallel import ParallelContext
from tests.harness import run_distributed

pytestmark = pytest.mark.dist
TOKENS, VOCAB = 24, 96


def compare_with_megatron(rank: int, world: int) -> dict:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, TOKENS // 2, VOCAB, generator=gen) * 3
    labels = torch.randint(0, VOCAB, (2, TOKENS // 2), generator=gen)
    mask = (torch.rand(2, TOKENS // 2, generator=gen) > 0.2).float()
    report = {}
    for tp in (1, 2, 4):
        ctx = ParallelContext.from_env(tp=tp)
        lo, hi = ctx.vocab_range(VOCAB)
        ours = logits[..., lo:hi].clone().requires_grad_()
        out = distill_loss(ours, None, divergence="ce", tp_group=ctx.tp_group, labels=labels, loss_mask=mask)
        out.loss.backward()
        theirs = logits[..., lo:hi].clone().requires_grad_()
        per_token = vocab_parallel_cross_entropy(theirs.clone(), labels)  # it overwrites its input
        ((per_token * mask).sum() / mask.sum()).backward()
        report[tp] = (out.loss.item(), ((per_token * mask).sum() / mask.sum()).item(),
                      (ours.grad - theirs.grad).abs().max().item(), theirs.grad.abs().max().item())
        ctx.destroy()
    return report


def test_hard_label_ce_equals_megatron_vocab_parallel_cross_entropy():
    for rank_report in run_distributed(compare_with_megatron, 4):
        for tp, (ours, theirs, grad_diff, grad_scale) in rank_report.items():
            assert ours == pytest.approx(theirs, rel=1e-6), f"tp={tp}"
            assert grad_diff <= 1e-6 * grad_scale, f"tp={tp}: gradients differ by {grad_diff}"

"""The loss's communication contract at tp = 2: all-reduces of O(N) and O(N·K) numbers, no gathers."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.losses import DenseTargets, SparseTargets, distill_loss
from tests.harness import run_distributed

pytestmark = pytest.mark.dist
TOKENS, VOCAB, K = 64, 4096, 8


def count_communication(rank: int, world: int) -> dict:
    counted = {"all_reduce": 0, "calls": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        counted["all_reduce"] += tensor.numel()
        counted["calls"] += 1
        return real_all_reduce(tensor, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the loss must not gather anything")

    for name in ("all_gather", "all_gather_into_tensor", "all_to_all", "broadcast", "gather"):
        setattr(dist, name, refuse)
    dist.all_reduce = counting_all_reduce
    gen = torch.Generator().manual_seed(rank)
    student = torch.randn(TOKENS, VOCAB // world, generator=gen, requires_grad=True)
    ids = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:K].repeat(TOKENS, 1)
    sparse = SparseTargets(ids, torch.full((TOKENS, K), -3.0), torch.full((TOKENS,), float(torch.tensor(1 - K * torch.e**-3).log())))
    report = {}
    for name, targets in (("sparse", sparse), ("dense", DenseTargets(torch.randn(TOKENS, VOCAB // world)))):
        counted.update(all_reduce=0, calls=0)
        distill_loss(student, targets, divergence="js", tp_group=dist.group.WORLD, chunk_size=16,
                     labels=torch.zeros(TOKENS, dtype=torch.long), ce_weight=0.5).loss.backward()
        report[name] = dict(counted)
    return report


def test_communication_is_linear_in_tokens_and_k_and_never_gathers():
    report = run_distributed(count_communication, 2)[0]
    chunks = TOKENS // 16
    assert report["sparse"]["all_reduce"] <= TOKENS * (K + 4) + 8, report
    assert report["dense"]["all_reduce"] <= TOKENS * 9 + 8, report
    assert report["sparse"]["calls"] <= 2 * chunks + 1 and report["dense"]["calls"] <= 3 * chunks + 1, report

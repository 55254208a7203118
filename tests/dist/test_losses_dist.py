"""distill_loss over tp = 2 and 4 gloo ranks against the float64 single-process reference.

One spawn per world size runs every case; each rank returns its loss, metrics and gradient shard,
and the parent reassembles the gradient and compares it with autograd on the gathered vocabulary.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_distributed
from tests.reference import all_cases, assert_matches_reference, run_case

pytestmark = pytest.mark.dist
CASES = all_cases()


def tp_worker(rank: int, world: int, tp: int) -> dict:
    groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]
    group = groups[rank // tp]
    return {case.name: run_case(case, group, rank % tp, tp, chunk_size=5) for case in CASES}


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def tp_results(request):
    tp = request.param
    return tp, run_distributed(tp_worker, tp, tp)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_float64_reference(tp_results, case):
    _, results = tp_results
    assert_matches_reference(case, [r[case.name] for r in results])

"""ParallelContext on 4 gloo processes: every TP layout of 4 in one spawn, checked in the parent."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.harness import run_distributed

WORLD = 4
LAYOUTS = (1, 2, 4)
VOCAB = 1000


def _membership(group, rank: int, world_size: int) -> list[int]:
    """The global ranks in `group`, found by all-reducing a one-hot vector over it."""
    onehot = torch.zeros(world_size, dtype=torch.int64)
    onehot[rank] = 1
    dist.all_reduce(onehot, group=group)
    return [r for r in range(world_size) if onehot[r] == 1] if int(onehot.max()) == 1 else onehot.tolist()


def _layout_report(ctx, rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state as ps

    rank_sum = torch.tensor([rank])
    dist.all_reduce(rank_sum, group=ctx.tp_group)
    padded = ctx.padded_vocab_size(VOCAB, multiple=8)
    return {
        "sizes": (ctx.world_size, ctx.rank, ctx.local_rank, ctx.tp_size, ctx.tp_rank, ctx.dp_size, ctx.dp_rank),
        "tp_members": _membership(ctx.tp_group, rank, world_size),
        "dp_members": _membership(ctx.dp_group, rank, world_size),
        "tp_rank_sum": int(rank_sum),
        "megatron": (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(),
                     ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(),
                     ps.get_tensor_model_parallel_group() is ctx.tp_group,
                     ps.get_data_parallel_group() is ctx.dp_group),
        "mpu": (ctx.get_tensor_model_parallel_world_size(), ctx.get_tensor_model_parallel_rank(),
                ctx.get_model_parallel_world_size(), ctx.get_model_parallel_rank(),
                ctx.get_data_parallel_world_size(), ctx.get_data_parallel_rank(),
                ctx.get_pipeline_model_parallel_world_size(), ctx.get_pipeline_model_parallel_rank(),
                ctx.get_tensor_model_parallel_src_rank()),
        "mpu_groups": (dist.get_process_group_ranks(ctx.get_tensor_model_parallel_group()),
                       dist.get_process_group_ranks(ctx.get_model_parallel_group()),
                       dist.get_process_group_ranks(ctx.get_data_parallel_group()),
                       ctx.get_data_parallel_group_ranks(),
                       dist.get_process_group_ranks(ctx.get_pipeline_model_parallel_group())),
        "padded": padded,
        "vocab_range": ctx.vocab_range(padded),
        "describe": ctx.describe(),
    }


def _every_layout(rank: int, world_size: int) -> dict:
    from megatron.core import parallel_state as ps
    from pipeline.parallel import ParallelContext

    reports = {}
    for tp in LAYOUTS:
        with ParallelContext.from_env(tp=tp) as ctx:
            reports[tp] = _layout_report(ctx, rank, world_size)
        assert dist.is_initialized(), "the context destroyed a default group it did not create"
        assert not ps.model_parallel_is_initialized()
    try:
        ParallelContext.from_env(tp=3)
        reports["tp3_error"] = None
    except ValueError as err:
        reports["tp3_error"] = str(err)
    reports["megatron_clean_after_error"] = not ps.model_parallel_is_initialized()
    return reports


@pytest.fixture(scope="module")
def results():
    """Every rank's reports from ONE spawn of 4 processes (a spawn costs seconds; the tests share it)."""
    return run_distributed(_every_layout, WORLD)


@pytest.mark.dist
def test_every_tp_layout_of_four_processes(results):
    for tp in LAYOUTS:
        dp = WORLD // tp
        reports = [res[tp] for res in results]
        for rank, rep in enumerate(reports):
            tp_rank, dp_rank = rank % tp, rank // tp
            tp_ranks = list(range(dp_rank * tp, (dp_rank + 1) * tp))
            dp_ranks = list(range(tp_rank, WORLD, tp))
            assert rep["sizes"] == (WORLD, rank, rank, tp, tp_rank, dp, dp_rank)
            assert rep["tp_members"] == tp_ranks, (tp, rank)
            assert rep["dp_members"] == dp_ranks, (tp, rank)
            assert rep["tp_rank_sum"] == sum(tp_ranks)
            assert rep["megatron"] == (tp, tp_rank, dp, dp_rank, True, True)
            assert rep["mpu"] == (tp, tp_rank, tp, tp_rank, dp, dp_rank, 1, 0, dp_rank * tp)
            assert rep["mpu_groups"] == (tp_ranks, tp_ranks, dp_ranks, dp_ranks, [rank])
            assert f"world={WORLD} dp={dp} tp={tp} rank={rank}" in rep["describe"]
        padded = reports[0]["padded"]
        assert padded >= VOCAB and padded % (8 * tp) == 0
        assert all(rep["padded"] == padded for rep in reports)
        # The TP ranks of one DP group cover the padded vocab exactly once, in rank order.
        for dp_rank in range(dp):
            ranges = [reports[dp_rank * tp + t]["vocab_range"] for t in range(tp)]
            covered = [i for start, end in ranges for i in range(start, end)]
            assert covered == list(range(padded)), (tp, dp_rank, ranges)


@pytest.mark.dist
def test_tp_three_on_four_processes_fails_clearly_on_every_rank(results):
    for res in results:
        assert res["tp3_error"] is not None, "tp=3 on 4 processes was accepted"
        assert "tp=3" in res["tp3_error"] and "world size 4" in res["tp3_error"]
        assert "[1, 2, 4]" in res["tp3_error"]
        assert res["megatron_clean_after_error"]

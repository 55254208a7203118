"""DeepSpeed ZeRO-3 on CPU/gloo with ParallelContext as its `mpu`: one step matches a one-process AdamW step.

Two processes, two layouts in one spawn: tp=1 (ZeRO shards over both ranks) and tp=2 (dp=1: ZeRO
must shard over the DP group of one rank, not the world). Each DP rank trains on its own micro-batch;
the reference trains one AdamW step on the concatenation of the DP ranks' micro-batches.

DeepSpeed on CPU needs: DS_ACCELERATOR=cpu (else it guesses CPU with a warning) and `torch_adam: true`
(else it JIT-compiles a CPU FusedAdam, about a minute on 2 cores). DeepSpeed is imported as the trainer
imports it (`import_deepspeed`), which also keeps its CPU comm backend from JIT-building a shared-memory
all-reduce op nothing here uses.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from tests.harness import run_distributed

WORLD = 2
LAYOUTS = (1, 2)
MICRO_BATCH = 3
LR, WEIGHT_DECAY = 0.1, 0.01
CONFIG = {
    "train_micro_batch_size_per_gpu": MICRO_BATCH,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 3},
    "fp16": {"enabled": False},
    "bf16": {"enabled": False},
    "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY, "torch_adam": True}},
    "steps_per_print": 10**9,
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _micro_batch(dp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + dp_rank)
    return torch.randn(MICRO_BATCH, 8, generator=gen), torch.randn(MICRO_BATCH, 4, generator=gen)


def _one_zero3_step(rank: int, world_size: int) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.distributed as dist

    from pipeline.parallel import ParallelContext
    from pipeline.train.engine import import_deepspeed

    out = {}
    for tp in LAYOUTS:
        with ParallelContext.from_env(tp=tp) as ctx:
            deepspeed = import_deepspeed(ctx)
            engine, optimizer, _, _ = deepspeed.initialize(
                model=_model(), config=copy.deepcopy(CONFIG), mpu=ctx, dist_init_required=False)
            inputs, targets = _micro_batch(ctx.dp_rank)
            loss = torch.nn.functional.mse_loss(engine(inputs), targets)
            engine.backward(loss)
            engine.step()
            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params):
                weights = [p.detach().clone() for p in params]
            out[tp] = {"weights": weights, "dp_world_size": engine.dp_world_size,
                       "zero_group": dist.get_process_group_ranks(optimizer.dp_process_group),
                       "dp_ranks": ctx.get_data_parallel_group_ranks()}
            engine.destroy()
    return out


def _reference(dp_size: int) -> list[torch.Tensor]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    inputs, targets = (torch.cat(parts) for parts in zip(*(_micro_batch(r) for r in range(dp_size))))
    torch.nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.dist
def test_zero3_step_with_parallel_context_as_mpu_matches_one_process():
    results = run_distributed(_one_zero3_step, WORLD)
    initial = [p.detach() for p in _model().parameters()]
    for tp in LAYOUTS:
        dp = WORLD // tp
        expected = _reference(dp)
        for rank, res in enumerate(results):
            got = res[tp]
            assert got["dp_world_size"] == dp
            assert got["zero_group"] == got["dp_ranks"] == list(range(rank % tp, WORLD, tp))
            rank0 = results[0][tp]["weights"]
            for i, (w, w0, ref, w_rank0) in enumerate(zip(got["weights"], initial, expected, rank0)):
                assert not torch.equal(w, w0), f"tp={tp} rank {rank}: parameter {i} did not change"
                assert torch.equal(w, w_rank0), f"tp={tp} rank {rank}: parameter {i} differs from rank 0"
                torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)

"""ParallelContext in a world of one process; layout arithmetic; launch-environment errors."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipeline.parallel import (
    LaunchEnv, ParallelContext, check_tp_size, pad_vocab_size, read_launch_env, valid_tp_sizes,
    vocab_shard_range,
)

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.fixture
def bare_env(monkeypatch):
    """No launcher variables, as under a plain `python script.py`; nothing left initialised afterwards."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    from megatron.core import parallel_state
    assert not parallel_state.model_parallel_is_initialized(), "a test left megatron's state behind"
    if dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("a test left the default process group behind")


@pytest.fixture
def ctx(bare_env):
    context = ParallelContext.from_env()
    yield context
    context.destroy()


# ---------------------------------------------------------------- world of one

def test_plain_python_gives_a_world_of_one(ctx):
    from megatron.core import parallel_state as ps

    assert (ctx.world_size, ctx.rank, ctx.local_rank) == (1, 0, 0)
    assert (ctx.tp_size, ctx.tp_rank, ctx.dp_size, ctx.dp_rank) == (1, 0, 1, 0)
    assert ctx.backend == "gloo" and ctx.device == torch.device("cpu")
    assert dist.get_process_group_ranks(ctx.tp_group) == [0] == dist.get_process_group_ranks(ctx.dp_group)
    assert ctx.tp_group is ps.get_tensor_model_parallel_group()
    assert ctx.dp_group is ps.get_data_parallel_group()
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_data_parallel_world_size() == 1
    line = ctx.describe()
    assert "\n" not in line
    for part in ("world=1", "dp=1", "tp=1", "rank=0", "backend=gloo", "device=cpu"):
        assert part in line


def test_destroy_tears_everything_down_and_is_idempotent(bare_env):
    from megatron.core import parallel_state as ps

    with ParallelContext.from_env() as context:
        assert dist.is_initialized() and ps.model_parallel_is_initialized()
    assert not dist.is_initialized() and not ps.model_parallel_is_initialized()
    context.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        context.tp_group


def test_adopted_default_group_is_left_alone(single_process_group):
    context = ParallelContext.from_env()
    assert context.backend == "gloo" and context.world_size == 1
    context.destroy()
    assert dist.is_initialized()


def test_tp_that_does_not_divide_the_world_is_a_clear_error(bare_env):
    with pytest.raises(ValueError, match=r"tp=2.*world size 1.*valid tp values.*\[1\]"):
        ParallelContext.from_env(tp=2)
    assert not dist.is_initialized()


def test_second_context_while_one_is_alive_is_refused(ctx):
    with pytest.raises(RuntimeError, match="already initialised"):
        ParallelContext.from_env()
    assert ctx.get_tensor_model_parallel_world_size() == 1  # the first one is untouched


def test_mpu_interface_on_one_process(ctx):
    assert ctx.get_tensor_model_parallel_group() is ctx.tp_group
    assert ctx.get_data_parallel_group() is ctx.dp_group
    assert ctx.get_data_parallel_group_ranks() == [0]
    assert (ctx.get_model_parallel_rank(), ctx.get_model_parallel_world_size()) == (0, 1)
    assert (ctx.get_pipeline_model_parallel_rank(), ctx.get_pipeline_model_parallel_world_size()) == (0, 1)
    assert ctx.get_tensor_model_parallel_src_rank() == 0
    assert not hasattr(ctx, "initialize_sequence_parallel")  # DeepSpeed would treat it as a Ulysses mpu


def test_seed_makes_python_numpy_and_torch_repeatable(ctx):
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    ctx.seed(1234)
    first = draw()
    ctx.seed(1234)
    assert draw() == first


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_nccl_without_cuda_is_refused(bare_env):
    with pytest.raises(ValueError, match="nccl.*CUDA"):
        ParallelContext.from_env(backend="nccl")
    assert not dist.is_initialized()


# ---------------------------------------------------------------- layout arithmetic

def test_valid_tp_sizes_are_the_divisors():
    assert valid_tp_sizes(1) == [1]
    assert valid_tp_sizes(12) == [1, 2, 3, 4, 6, 12]
    check_tp_size(4, 8)
    for bad in (0, -1, 3, 16):
        with pytest.raises(ValueError, match=rf"tp={bad}.*world size 8.*\[1, 2, 4, 8\]"):
            check_tp_size(bad, 8)


@pytest.mark.parametrize("vocab, tp, multiple, expected", [
    (32000, 1, 128, 32000), (32001, 1, 128, 32128), (32000, 2, 128, 32000), (32000, 3, 128, 32256),
    (50257, 4, 128, 50688), (1, 8, 1, 8), (7, 2, 4, 8), (128, 1, 128, 128)])
def test_pad_vocab_size(vocab, tp, multiple, expected):
    padded = pad_vocab_size(vocab, tp, multiple)
    assert padded == expected and padded >= vocab and padded % (multiple * tp) == 0
    assert padded - vocab < multiple * tp


@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_vocab_shards_partition_the_padded_vocab(tp):
    padded = pad_vocab_size(1000, tp, 16)
    ranges = [vocab_shard_range(padded, tp, r) for r in range(tp)]
    assert ranges[0][0] == 0 and ranges[-1][1] == padded
    assert all(a_end == b_start for (_, a_end), (b_start, _) in zip(ranges, ranges[1:]))
    assert len({end - start for start, end in ranges}) == 1


def test_vocab_range_errors():
    with pytest.raises(ValueError, match=r"1001.*tp=2.*1024"):
        vocab_shard_range(1001, 2, 0)
    with pytest.raises(ValueError, match="tp_rank=2"):
        vocab_shard_range(1024, 2, 2)
    with pytest.raises(ValueError, match="vocab=0"):
        pad_vocab_size(0, 2)


def test_context_vocab_helpers(ctx):
    assert ctx.padded_vocab_size(32001) == 32128
    assert ctx.vocab_range(32128) == (0, 32128)


# ---------------------------------------------------------------- launch environment

def test_torchrun_variables_are_read():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert read_launch_env(env) == LaunchEnv(rank=3, world_size=4, local_rank=1, launcher="torchrun")


def test_srun_variables_are_the_fallback():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    assert read_launch_env(env) == LaunchEnv(rank=5, world_size=8, local_rank=1, launcher="srun")
    assert read_launch_env({}) == LaunchEnv(rank=0, world_size=1, local_rank=0, launcher="none")


@pytest.mark.parametrize("env, missing, launcher", [
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK", "torchrun"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK", "torchrun"),
    ({"RANK": "1"}, "WORLD_SIZE", "torchrun"),
    ({"SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, "SLURM_PROCID", "srun"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_LOCALID", "srun"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "29500"}, "MASTER_ADDR", "torchrun"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT", "torchrun"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0"}, "MASTER_ADDR", "srun"),
])
def test_missing_variable_is_named_with_its_launcher(bare_env, env, missing, launcher):
    for name, value in env.items():
        bare_env.setenv(name, value)
    with pytest.raises(RuntimeError, match=rf"environment variable {missing} is not set;.*{launcher}"):
        ParallelContext.from_env()
    assert not dist.is_initialized()


def test_malformed_or_inconsistent_variables(bare_env):
    bare_env.setenv("RANK", "zero")
    bare_env.setenv("WORLD_SIZE", "2")
    bare_env.setenv("LOCAL_RANK", "0")
    with pytest.raises(RuntimeError, match="RANK='zero' is not an integer"):
        ParallelContext.from_env()
    bare_env.setenv("RANK", "2")
    with pytest.raises(RuntimeError, match="RANK=2, WORLD_SIZE=2"):
        ParallelContext.from_env()


def test_world_of_one_from_torchrun_variables(bare_env):
    from tests.harness import free_port

    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        bare_env.setenv(name, value)
    with ParallelContext.from_env() as context:
        assert (context.world_size, context.rank) == (1, 0)

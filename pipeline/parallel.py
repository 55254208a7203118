"""The parallel layout of one job: world, tensor-parallel (TP) and data-parallel (DP) sizes, ranks and groups.

What it is for. Every stage that runs under `torchrun` or `srun` builds one `ParallelContext` with
`ParallelContext.from_env(tp=...)` and hands it (or its `tp_group`/`dp_group`) to whatever
communicates. It initialises the default process group when nobody has, initialises megatron-core's
`parallel_state` so that megatron's TP layers and our code use the very same groups, and serves as
DeepSpeed's `mpu` (`deepspeed.initialize(..., mpu=ctx)`), so that ZeRO shards over the DP group only.

Layout. `world = dp × tp` with TP ranks contiguous: global rank = dp_rank·tp + tp_rank, which is
megatron-core's default order ("tp-cp-ep-dp-pp" with cp = ep = pp = 1); the groups megatron builds
are checked against this formula. The vocabulary is split contiguously over TP ranks.

Design choice. The layout is an explicit object, and process groups are passed explicitly to every
function that communicates; nothing reads a global group behind anyone's back. The one exception is
megatron-core's module-level `parallel_state`, which its layers read and which this module alone
owns: it is created in `from_env` and torn down in `destroy`, so at most one context is alive per
process. The pure functions (`valid_tp_sizes`, `vocab_shard_range`, `pad_vocab_size`,
`read_launch_env`) hold the arithmetic and environment parsing, so they are tested without processes.

Cost. `from_env` is collective over the world: megatron creates about 18 process groups per layout
(one rendezvous each through the TCP store; well under a second for 4 local gloo processes) and
importing megatron-core takes a few seconds, which is why it is imported lazily. After that the
context costs nothing: the getters read plain attributes.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SRUN_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
_HINTS = {
    "torchrun": "torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process; "
                "launch with torchrun, or with srun (which sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID)",
    "srun": "srun sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID for every task; start the job step "
            "with srun, or launch with torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK)",
    "rendezvous": "torchrun sets MASTER_ADDR and MASTER_PORT; under srun export them before srun, e.g. "
                  "MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) MASTER_PORT=29500",
}


# --------------------------------------------------------------------------- pure helpers

def valid_tp_sizes(world_size: int) -> list[int]:
    """The TP sizes a world of `world_size` processes can be split into: the divisors of it."""
    return [d for d in range(1, world_size + 1) if world_size % d == 0]


def check_tp_size(tp: int, world_size: int) -> None:
    """Raise a ValueError unless `tp` divides `world_size` (naming both and the valid values)."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1 or world_size % tp != 0:
        raise ValueError(
            f"tensor-parallel size tp={tp!r} does not divide the world size {world_size}; "
            f"valid tp values for {world_size} processes: {valid_tp_sizes(world_size)}")


def pad_vocab_size(vocab: int, tp_size: int, multiple: int = 128) -> int:
    """`vocab` rounded up to a multiple of `multiple`·`tp_size`, so every TP shard is aligned."""
    if vocab < 1 or multiple < 1 or tp_size < 1:
        raise ValueError(f"pad_vocab_size needs vocab, multiple and tp_size >= 1; "
                         f"got vocab={vocab}, multiple={multiple}, tp_size={tp_size}")
    step = multiple * tp_size
    return -(-vocab // step) * step


def vocab_shard_range(padded_vocab: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """Token ids `[start, end)` owned by TP rank `tp_rank`: the contiguous split of `padded_vocab`."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is outside [0, tp_size={tp_size})")
    if padded_vocab < 1 or padded_vocab % tp_size != 0:
        raise ValueError(
            f"padded vocab size {padded_vocab} is not a positive multiple of tp={tp_size}; "
            f"pad it first (padded_vocab_size gives {pad_vocab_size(max(padded_vocab, 1), tp_size)})")
    per_rank = padded_vocab // tp_size
    return tp_rank * per_rank, (tp_rank + 1) * per_rank


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher told this process: its rank, the world size, its rank on the node."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun", "srun" or "none" (plain `python script.py`: a world of one)


def _env_int(env: Mapping[str, str], name: str, hint: str) -> int:
    if name not in env:
        raise RuntimeError(f"environment variable {name} is not set; {_HINTS[hint]}")
    try:
        return int(env[name])
    except ValueError:
        raise RuntimeError(f"environment variable {name}={env[name]!r} is not an integer; {_HINTS[hint]}") from None


def read_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Rank, world size and local rank from torchrun's variables, else srun's, else a world of one.

    torchrun's RANK/WORLD_SIZE win over srun's SLURM_* (an sbatch script running torchrun has both).
    A missing or malformed variable is a RuntimeError that names it and the launcher that sets it.
    """
    env = os.environ if environ is None else environ
    if any(name in env for name in _TORCHRUN_VARS[:2]):
        launcher, names = "torchrun", _TORCHRUN_VARS
    elif any(name in env for name in _SRUN_VARS[:2]):
        launcher, names = "srun", _SRUN_VARS
    else:
        return LaunchEnv(rank=0, world_size=1, local_rank=0, launcher="none")
    rank, world_size, local_rank = (_env_int(env, name, launcher) for name in names)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise RuntimeError(f"inconsistent launch environment from {launcher}: {names[0]}={rank}, "
                           f"{names[1]}={world_size}, {names[2]}={local_rank} (need 0 <= rank < world size)")
    return LaunchEnv(rank=rank, world_size=world_size, local_rank=local_rank, launcher=launcher)


def _rendezvous(env: Mapping[str, str], world_size: int) -> dict:
    """How rank 0's store is reached: MASTER_ADDR/MASTER_PORT over TCP, or, for a world of one launched without
    them, an in-process HashStore (a free port picked here could be taken by another process before the store
    binds it, and one process has nobody to meet)."""
    if world_size == 1 and "MASTER_ADDR" not in env and "MASTER_PORT" not in env:
        return {"store": dist.HashStore()}
    if "MASTER_ADDR" not in env:
        raise RuntimeError(f"environment variable MASTER_ADDR is not set; {_HINTS['rendezvous']}")
    return {"init_method": f"tcp://{env['MASTER_ADDR']}:{_env_int(env, 'MASTER_PORT', 'rendezvous')}"}


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend={backend!r} is not one of 'auto', 'nccl', 'gloo'")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA, which is not available here; use 'gloo' or 'auto'")
    return backend


def _init_default_group(launch: LaunchEnv, backend: str, timeout_minutes: float) -> torch.device:
    """Initialise the default process group (on CUDA first binding this process to its GPU)."""
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, **_rendezvous(os.environ, launch.world_size),
                            rank=launch.rank, world_size=launch.world_size,
                            timeout=timedelta(minutes=timeout_minutes))
    return device


def _adopt_default_group(launch: LaunchEnv, backend: str) -> tuple[str, torch.device]:
    """Check an already initialised default group against the environment; return its backend, device."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if launch.launcher != "none" and (launch.rank, launch.world_size) != (rank, world_size):
        raise RuntimeError(f"the default process group has rank {rank} of {world_size}, but {launch.launcher}'s "
                           f"environment says rank {launch.rank} of {launch.world_size}")
    actual = dist.get_backend()
    if backend != "auto" and backend not in actual:
        raise ValueError(f"backend={backend!r} was asked for, but the default group already uses {actual!r}")
    if "nccl" in actual:
        local_rank = launch.local_rank if launch.launcher != "none" else torch.cuda.current_device()
        return actual, torch.device("cuda", local_rank)
    return actual, torch.device("cpu")


# --------------------------------------------------------------------------- the context

class ParallelContext:
    """World/TP/DP sizes, ranks and groups of this process; also DeepSpeed's `mpu`. Build with `from_env`."""

    def __init__(self, *, launch: LaunchEnv, tp_size: int, backend: str, device: torch.device,
                 groups: dict, owns_default_group: bool):
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.local_rank = launch.local_rank
        self.tp_size = tp_size
        self.dp_size = self.world_size // tp_size
        self.tp_rank = self.rank % tp_size
        self.dp_rank = self.rank // tp_size
        self.backend = backend
        self.device = device
        self._groups = groups  # "tp", "dp", "mp", "pp": megatron's groups for this rank
        self._owns_default_group = owns_default_group
        self._alive = True

    @classmethod
    def from_env(cls, tp: int = 1, backend: str = "auto", timeout_minutes: float = 30) -> "ParallelContext":
        """Build the context from torchrun's/srun's environment (collective over the whole world).

        Initialises the default group unless one exists (then it is adopted and left alone by
        `destroy`), then megatron-core's parallel state with `tp`. A `tp` that does not divide the
        world size is a ValueError on every rank, raised before any group is created.
        """
        launch = read_launch_env()
        owns = not dist.is_initialized()
        world_size = launch.world_size if owns else dist.get_world_size()
        check_tp_size(tp, world_size)
        if owns:
            backend = _resolve_backend(backend)
            device = _init_default_group(launch, backend, timeout_minutes)
        else:
            backend, device = _adopt_default_group(launch, backend)
        try:
            groups = _init_megatron(tp, timeout_minutes)
        except BaseException:
            if owns:
                dist.destroy_process_group()
            raise
        return cls(launch=launch, tp_size=tp, backend=backend, device=device, groups=groups,
                   owns_default_group=owns)

    # ---- groups and derived values

    def _group(self, name: str):
        if not self._alive:
            raise RuntimeError("this ParallelContext was destroyed; build a new one with ParallelContext.from_env")
        return self._groups[name]

    @property
    def tp_group(self):
        """The process group of the `tp_size` ranks that share this rank's samples and split its vocab."""
        return self._group("tp")

    @property
    def dp_group(self):
        """The process group of the `dp_size` ranks with this rank's tp_rank (ZeRO shards over it)."""
        return self._group("dp")

    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group (the source of TP broadcasts)."""
        return self.dp_rank * self.tp_size

    def vocab_range(self, padded_vocab: int) -> tuple[int, int]:
        """Token ids `[start, end)` of this TP rank's vocab shard; padded_vocab must divide by tp."""
        return vocab_shard_range(padded_vocab, self.tp_size, self.tp_rank)

    def padded_vocab_size(self, vocab: int, multiple: int = 128) -> int:
        """`vocab` rounded up to a multiple of `multiple`·tp."""
        return pad_vocab_size(vocab, self.tp_size, multiple)

    def describe(self) -> str:
        """One line for logs."""
        return (f"world={self.world_size} dp={self.dp_size} tp={self.tp_size} rank={self.rank} "
                f"(dp_rank={self.dp_rank} tp_rank={self.tp_rank} local_rank={self.local_rank}) "
                f"backend={self.backend} device={self.device}")

    def __repr__(self) -> str:
        return f"ParallelContext({self.describe()}{'' if self._alive else ', destroyed'})"

    def seed(self, seed: int) -> None:
        """Seed python, numpy and torch with `seed` (identical on all ranks); on CUDA also megatron's tracker.

        megatron's tracker gives TP-sharded regions (TP weight init, dropout) a stream that differs
        by tp_rank and is the same across DP groups; call this before building megatron layers on CUDA.
        """
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        if self.device.type == "cuda":
            from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
            model_parallel_cuda_manual_seed(seed, tp_rank=self.tp_rank, ep_rank=0, etp_rank=self.tp_rank)

    def with_tp(self, tp: int) -> "ParallelContext":
        """A new context at `tp` over this one's default group (which it takes over); this one is destroyed.

        Collective. For a job with two phases at different TP sizes (`distill prune`: the teacher at its TP,
        then the small student at TP 1) without tearing down and re-initialising the default group.
        """
        owns, backend = self._owns_default_group, self.backend
        self._owns_default_group = False
        self.destroy()
        try:
            new = ParallelContext.from_env(tp, backend=backend)
        except BaseException:
            if owns and dist.is_initialized():
                dist.destroy_process_group()
            raise
        new._owns_default_group = owns
        return new

    # ---- teardown

    def destroy(self) -> None:
        """Tear down megatron's parallel state and its groups, and the default group if this context made it.

        Idempotent. Collective only in the sense that every rank should call it before building the next context.
        """
        if not self._alive:
            return
        self._alive = False
        _destroy_megatron()
        if self._owns_default_group and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> "ParallelContext":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    # ---- DeepSpeed / Megatron `mpu` interface (pipeline size is always 1)

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp_src_rank

    def get_model_parallel_group(self):
        return self._group("mp")  # tp × pp ranks; the same ranks as tp_group since pp = 1

    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return [self.tp_rank + i * self.tp_size for i in range(self.dp_size)]

    def get_pipeline_model_parallel_group(self):
        return self._group("pp")  # this rank alone

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    # Deliberately absent: `initialize_sequence_parallel` and the sequence-parallel getters. DeepSpeed
    # takes an mpu that has `initialize_sequence_parallel` for a Ulysses one and then ignores its DP group.


# --------------------------------------------------------------------------- megatron-core's state

def _init_megatron(tp: int, timeout_minutes: float) -> dict:
    """Initialise megatron-core's parallel state for `tp`; return its groups after checking their ranks.

    Groups use the default group's backend (gloo on CPU, nccl on CUDA). megatron's extra gloo copies
    of the DP groups (for its own distributed optimizer's checkpoints, unused here) are not created.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron-core's parallel state is already initialised in this process; "
                           "destroy() the previous ParallelContext before building another")
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, context_parallel_size=1,
            expert_model_parallel_size=1, distributed_timeout_minutes=timeout_minutes,
            create_gloo_process_groups=False)
        groups = {"tp": parallel_state.get_tensor_model_parallel_group(),
                  "dp": parallel_state.get_data_parallel_group(),
                  "mp": parallel_state.get_model_parallel_group(),
                  "pp": parallel_state.get_pipeline_model_parallel_group()}
        _check_layout(groups, tp)
    except BaseException:
        _destroy_megatron()
        raise
    return groups


def _check_layout(groups: dict, tp: int) -> None:
    """Raise unless megatron's groups are the contiguous-TP layout this module promises."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tp_rank, dp_rank = rank % tp, rank // tp
    expected = {"tp": list(range(dp_rank * tp, (dp_rank + 1) * tp)),
                "dp": list(range(tp_rank, world_size, tp)),
                "mp": list(range(dp_rank * tp, (dp_rank + 1) * tp)),
                "pp": [rank]}
    for name, ranks in expected.items():
        actual = dist.get_process_group_ranks(groups[name])
        if actual != ranks:
            raise RuntimeError(f"megatron-core built {name} group {actual} on rank {rank}, expected {ranks} "
                               f"(global rank = dp_rank*tp + tp_rank, tp={tp}); its rank order has changed")


def _destroy_megatron() -> None:
    """Reset megatron's parallel state and destroy the groups it created on this rank."""
    from megatron.core import parallel_state

    created = [g for g in (parallel_state._global_process_group_list or []) if g is not None]
    parallel_state.destroy_model_parallel()
    if not dist.is_initialized():
        return
    live = dist.distributed_c10d._world.pg_map
    for group in {id(g): g for g in created}.values():
        if group in live:
            dist.destroy_process_group(group)

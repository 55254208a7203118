"""Shared pytest fixtures: a one-process gloo group that is always torn down.

Under pytest-xdist (`make test` runs two workers) each worker keeps torch to one thread, and so do the
processes it starts (OMP_NUM_THREADS), so that workers share the cores instead of oversubscribing them.

`make test` hands whole modules to the two workers in collection order (`--dist loadscope
--no-loadscope-reorder`); `pytest_collection_modifyitems` moves the few modules that take minutes each to the
front, so they start at once on both workers and the many short modules fill in around them. Left to
xdist's default (most tests first), they started last and one worker ran alone for minutes at the end.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.harness import free_port

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


LONGEST_FIRST = ("tests/slurm/test_multinode.py", "tests/e2e/test_readme.py", "tests/e2e/test_quickstart.py",
                 "tests/e2e/test_train_resume.py", "tests/dist/test_train_reshard.py")
"""Modules measured at the most of one worker's time (190, 146, 51, 46 and 36 s), longest first."""


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    first = len(LONGEST_FIRST)
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], first))  # stable: the rest keep their order


@pytest.fixture(scope="module")
def ctx():
    """A one-process `ParallelContext` (no process group), shared by a module's tests."""
    from pipeline.parallel import ParallelContext

    context = ParallelContext.from_env()
    yield context
    context.destroy()


@pytest.fixture
def single_process_group(monkeypatch):
    """A world of one gloo process for code that needs an initialised default group."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    if dist.is_initialized():
        dist.destroy_process_group()

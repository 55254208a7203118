"""Shared pytest fixtures: a one-process gloo group that is always torn down.

Under pytest-xdist (`make test` runs two workers) each worker keeps torch to one thread, and so do the
processes it starts (OMP_NUM_THREADS), so that workers share the cores instead of oversubscribing them.
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


@pytest.fixture
def single_process_group(monkeypatch):
    """A world of one gloo process for code that needs an initialised default group."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    if dist.is_initialized():
        dist.destroy_process_group()

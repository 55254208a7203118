"""Shared pytest fixtures: a one-process gloo group that is always torn down."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.harness import free_port


@pytest.fixture
def single_process_group(monkeypatch):
    """A world of one gloo process for code that needs an initialised default group."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield dist.group.WORLD
    if dist.is_initialized():
        dist.destroy_process_group()

"""Run a function in several gloo processes on localhost and report every rank's failure.

Distributed code is tested by running it in 2 or 4 real processes (spawned, not forked, so no
OpenMP or gloo state leaks from the pytest process) against a single-process reference computed in
the parent. The cost is a process start per call (a few seconds), so callers batch many cases into
one call and return their results to the parent, which asserts on them.
"""
from __future__ import annotations

import io
import os
import queue
import random
import socket
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 300


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on localhost that is free right now, drawn below the kernel's ephemeral range.

    A port the kernel hands out for bind(0) comes from the ephemeral range, where any outgoing connection
    (another test's gloo mesh, say) may take it before rank 0's store binds it; that raced once in CI as
    EADDRINUSE. Ports below the range are only ever taken on purpose, and a random draw keeps two xdist
    workers apart."""
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 20000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port on 127.0.0.1 below the ephemeral range (starts at {low})")


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, "ok", _to_bytes(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - every failure is reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _to_bytes(value: Any) -> bytes:
    """Results travel as torch.save bytes: tensors in a queue would share memory with a dying process."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> list:
    """Run `fn(rank, world_size, *args)` in `world_size` gloo processes; return each rank's result.

    `fn` must be importable (a module-level function) and its result picklable. Raises an
    AssertionError that quotes the traceback of every rank that failed, or names the ranks that
    neither finished nor failed within `timeout_s`.
    """
    for _ in range(3):
        outcomes = _run_once(fn, world_size, args, timeout_s)
        if not any(s == "error" and "EADDRINUSE" in p for s, p in outcomes.values()):
            break  # a port taken between free_port() and the store's bind is the one failure worth a retry
    return _verdict(outcomes, world_size, timeout_s)


def _run_once(fn: Callable, world_size: int, args: tuple, timeout_s: float) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    outcomes = _collect(results, world_size, timeout_s)
    for proc in procs:
        proc.join(timeout=5 if len(outcomes) == world_size else 0)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return outcomes


def _collect(results, world_size: int, timeout_s: float) -> dict:
    outcomes: dict[int, tuple[str, Any]] = {}
    while len(outcomes) < world_size:
        try:
            rank, status, payload = results.get(timeout=timeout_s)
        except queue.Empty:
            break
        outcomes[rank] = (status, payload)
        if status == "error":
            timeout_s = min(timeout_s, 10)  # the others are likely stuck in a collective now
    return outcomes


def _verdict(outcomes: dict, world_size: int, timeout_s: float) -> list:
    failures = [f"--- rank {r} failed:\n{p}" for r, (s, p) in sorted(outcomes.items()) if s == "error"]
    missing = [r for r in range(world_size) if r not in outcomes]
    if missing:
        failures.append(f"--- ranks {missing} neither finished nor failed within {timeout_s:.0f} s")
    if failures:
        raise AssertionError(f"distributed run of {world_size} processes failed:\n" + "\n".join(failures))
    return [torch.load(io.BytesIO(outcomes[r][1]), weights_only=False) for r in range(world_size)]

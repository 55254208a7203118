"""Preemption: SIGUSR1 or SIGTERM asks the run to stop; the ranks agree at a step boundary, save, and exit.

Slurm sends SIGUSR1 some time before a job's limit (`--signal=B:USR1@SECONDS`, forwarded by the batch
script) and SIGTERM when it cancels or preempts a job. A handler only sets a flag; at every step
boundary the ranks all-reduce it (MAX), so they all stop after the same step even when only some of
them got the signal, save a checkpoint and exit with `REQUEUE_EXIT_CODE`, which the sbatch scripts
read as "requeue me". Any other exit status means a real failure and is not requeued.

Design choice: one all-reduce of one integer per optimizer step (microseconds next to a step) instead
of checking less often; the cost of checking every step is nothing and the save starts at once.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75
"""Exit status of a run that saved a checkpoint because it was asked to stop (EX_TEMPFAIL: try again)."""
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Catches SIGUSR1/SIGTERM while active; `agreed()` tells every rank whether any rank was signalled."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def agreed(self, device: torch.device) -> bool:
        """Collective over the world: True on every rank when any rank has been signalled."""
        flag = torch.tensor([0 if self.signal is None else 1], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

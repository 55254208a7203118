"""Ranges of work for job arrays: `START:STOP` on the command line, or `array` for "my share of a Slurm array".

A Slurm job array runs the same command once per task with SLURM_ARRAY_TASK_ID set. With `array`,
task i of n (counted from SLURM_ARRAY_TASK_MIN over SLURM_ARRAY_TASK_COUNT tasks) takes the items
[i·count/n, (i+1)·count/n): every item goes to exactly one task, the shares differ by at most one,
and any array size works; a task with an empty share has nothing to do. Design choice: the split is
computed by the command from the item count it reads, not by the batch script, so a script never
needs to know how many shards or files there are; the cost is that the array must not change size
while its tasks run (a rerun with another size still completes: finished items are skipped).
"""
from __future__ import annotations

import argparse
import os
from typing import Mapping

ARRAY = "array"
_ARRAY_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT")


def parse_range(text: str) -> tuple[int, int] | str:
    """argparse type for `START:STOP` (two integers, 0 ≤ START ≤ STOP) or `array`."""
    if text == ARRAY:
        return ARRAY
    try:
        start, stop = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (two integers) or 'array', got {text!r}") from None
    if not 0 <= start <= stop:
        raise argparse.ArgumentTypeError(f"expected 0 ≤ START ≤ STOP, got {text!r}")
    return start, stop


def array_slice(count: int, environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This array task's share [start, stop) of `count` items."""
    env = os.environ if environ is None else environ
    missing = [name for name in _ARRAY_VARS if name not in env]
    if missing:
        raise ValueError(f"'array' takes this task's share of a Slurm job array, but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set; submit with sbatch --array=0-N, "
                         f"or give START:STOP")
    task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env["SLURM_ARRAY_TASK_MIN"])
    tasks = int(env["SLURM_ARRAY_TASK_COUNT"])
    if not 0 <= task < tasks:
        raise ValueError(f"array task {env['SLURM_ARRAY_TASK_ID']} is outside the array "
                         f"(min {env['SLURM_ARRAY_TASK_MIN']}, {tasks} tasks)")
    return task * count // tasks, (task + 1) * count // tasks

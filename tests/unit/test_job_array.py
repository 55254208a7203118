"""Job-array shares: every item goes to exactly one task whatever the array's size, and bad input is named."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from pipeline.job_array import ARRAY, array_slice, parse_range


def _env(task: int, tasks: int, first: int = 0) -> dict:
    return {"SLURM_ARRAY_TASK_ID": str(first + task), "SLURM_ARRAY_TASK_MIN": str(first),
            "SLURM_ARRAY_TASK_COUNT": str(tasks)}


@pytest.mark.parametrize("count, tasks", [(10, 3), (3, 5), (7, 7), (0, 2), (1000, 16)])
def test_array_shares_cover_every_item_once(count, tasks):
    shares = [array_slice(count, _env(task, tasks, first=4)) for task in range(tasks)]
    covered = [i for start, stop in shares for i in range(start, stop)]
    assert covered == list(range(count))
    sizes = [stop - start for start, stop in shares]
    assert max(sizes) - min(sizes) <= 1


def test_parse_range_and_its_errors():
    assert parse_range("2:5") == (2, 5) and parse_range("3:3") == (3, 3) and parse_range("array") == ARRAY
    for bad in ("5:2", "-1:3", "a:b", "3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_range(bad)


def test_array_outside_a_job_array_says_how_to_submit():
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT are not"):
        array_slice(4, {})
    with pytest.raises(ValueError, match="outside the array"):
        array_slice(4, _env(5, 3))


def test_cache_command_with_array_outside_an_array_exits_2(tmp_path):
    from tests.shardmaker import make_token_shards

    make_token_shards(tmp_path / "tokens", [2], seq_len=8, vocab_size=300)
    result = subprocess.run([sys.executable, "-m", "pipeline", "cache", "--shards", "array", f"teacher={tmp_path}",
                             f"tokens={tmp_path / 'tokens'}", f"output={tmp_path / 'out'}"],
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "--shards: 'array' takes this task's share" in result.stderr, result.stderr

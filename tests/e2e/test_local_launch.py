"""`launchers/local.sh` for real: train a tiny student on two torchrun ranks, stop and export it, refuse a bad stage.

Runs the script from another working directory, as a user would, so the repo is found from the script's
own path. The student is tests/trainkit.py's (CE only, no teacher), a few milliseconds a step on CPU.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.shardmaker import make_token_shards
from tests.trainkit import logged_steps, student_overrides

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launchers" / "local.sh"


def _local(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=240)


def _commit() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


@pytest.mark.slow
def test_two_ranks_log_their_header_stop_on_a_signal_and_export(tmp_path):
    """SIGUSR1 to local.sh: forwarded through torchrun, the ranks save and stop; torchrun turns their 75 into 1.

    The run's header (commit, stage, ranks, the resolved config) goes to stdout and to LOG_DIR's log, and the
    checkpoint saved on the signal exports through the same script.
    """
    tokens = tmp_path / "tokens"
    make_token_shards(tokens, [16, 16], seq_len=16, vocab_size=300)
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    overrides = student_overrides(run_dir, tokens, steps=1_000_000, parallel__backend="gloo")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NPROC": "2", "LOG_DIR": str(logs)}
    proc = subprocess.Popen(["bash", str(SCRIPT), "train", "--config", str(REPO / "configs" / "student_ce.yaml"),
                             *overrides], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 120
        while logged_steps(run_dir) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, out[-4000:]
    assert (run_dir / "checkpoints" / "latest").is_file()  # saved on the signal: no periodic checkpoints here
    assert 3 <= logged_steps(run_dir) < 1_000_000
    header = out.split("\n===\n", 1)[0]
    assert f"commit:  {_commit()}" in header and "stage:   train" in header and "nproc:   2" in header
    assert "--nproc-per-node 2" in header and "SIGUSR1" in header and "train_student.py" in header
    # the resolved config: the file's settings with the overrides applied
    assert "resolved config" in header and "divergence: ce" in header and "hidden_size: 64" in header
    assert f"run_dir: {run_dir}" in header and "steps: 1000000" in header
    log, = logs.glob("train-*.log")
    assert log.read_text().startswith("=== local.sh") and f"commit:  {_commit()}" in log.read_text()

    exported = tmp_path / "hf"
    done = _local(tmp_path, "export", "--checkpoint", str(run_dir), "--out", str(exported), "--quiet")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "stage:   export" in done.stdout and "resolved config" not in done.stdout
    assert json.loads((exported / "config.json").read_text())["hidden_size"] == 64


def test_bogus_stage_and_bad_config_are_refused(tmp_path):
    done = _local(tmp_path, "bogus")
    assert done.returncode != 0 and "unknown stage 'bogus'" in done.stderr
    assert "usage: launchers/local.sh" in done.stderr
    done = _local(tmp_path, "--help")
    assert done.returncode == 0 and "torchrun turns" in done.stdout and "usage: launchers/local.sh" in done.stdout
    done = _local(tmp_path, "train", "schedule.steps=-3", "run_dir=x")  # refused before torchrun starts
    assert done.returncode == 2 and "not started" in done.stderr and "torch.distributed.run" in done.stdout
    done = _local(tmp_path, "train", NPROC="two")
    assert done.returncode == 2 and "NPROC must be a positive integer" in done.stderr

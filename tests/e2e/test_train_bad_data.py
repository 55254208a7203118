"""`distill train` meeting a corrupt token shard in a data-loader worker: one message naming the shard, exit 2.

The shard is read only once training runs (the manifest is fine, data.verify is off), so the error is raised
inside a DataLoader worker process; the user must see the reader's message, not the worker's traceback.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.shardmaker import make_token_shards
from tests.trainkit import student_overrides

REPO = Path(__file__).resolve().parents[2]


def test_truncated_shard_in_a_loader_worker_is_one_message_naming_it(tmp_path):
    tokens = tmp_path / "tokens"
    make_token_shards(tokens, [12, 12], seq_len=16, vocab_size=300)
    for shard in sorted(tokens.glob("*.tar.gz")):  # both, whichever the order reads first
        data = shard.read_bytes()
        shard.write_bytes(data[:len(data) // 2])  # cut inside the gzip stream, mid-shard
    overrides = student_overrides(tmp_path / "run", tokens, steps=4) + ["data.num_workers=2"]
    done = subprocess.run([sys.executable, "-m", "pipeline", "train", *overrides], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "DataLoader worker" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert re.search(rf"shard-00000[01]\.tar\.gz of {re.escape(str(tokens))}: .*truncated", errors[0]), errors[0]

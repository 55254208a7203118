"""Kill `distill tokenize shard` with SIGKILL mid-run, rerun it: the same manifest and shard bytes as a clean run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tokenization_corpus import make_documents, write_blocks
from tokenization.errors import TokenizationError
from tokenization.shards import shard_corpus
from tokenization.tokenizer import train_tokenizer
from tokenization.verify import verify_shards

REPO = Path(__file__).resolve().parents[2]


def _command(inputs: Path, tok: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "pipeline", "tokenize", "shard", "--input", str(inputs / "*.txt"),
            "--tokenizer", str(tok), "--out", "out", "--seq-len", "64", "--txt-mode", "blocks",
            "--shard-max-samples", "40", "--workers", str(workers), "--no-progress"]


def _run(cwd: Path, command: list[str]) -> None:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("restart")
    inputs = root / "inputs"
    inputs.mkdir()
    for i in range(10):
        write_blocks(inputs / f"part{i:02d}.txt", make_documents(700, seed=i, words=(20, 120)))
    tok = root / "tokenizer.json"
    train_tokenizer([inputs / "part00.txt"], 800, out_path=tok, txt_mode="blocks")
    return root, inputs, tok


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_same_manifest_and_shards(corpus):
    root, inputs, tok = corpus
    (root / "clean").mkdir()
    _run(root / "clean", _command(inputs, tok, workers=2))
    killed = root / "killed"
    (killed / "out").mkdir(parents=True)
    proc = subprocess.Popen(_command(inputs, tok, workers=2), cwd=killed, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((killed / "out").glob("*.tar.gz"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its pool workers, as a preemption would
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "out" / "manifest.json").exists(), "the run finished before the kill; give it more input"
    _run(killed, _command(inputs, tok, workers=2))
    clean, rerun = _files(root / "clean" / "out"), _files(killed / "out")
    assert clean.keys() == rerun.keys() and clean == rerun
    assert _files(root / "clean" / "out" / "_progress").keys() == _files(killed / "out" / "_progress").keys()
    assert verify_shards(killed / "out") == []


def test_rerun_with_other_settings_is_refused(corpus, tmp_path):
    _, inputs, tok = corpus
    first = sorted(inputs.glob("*.txt"))[:1]
    shard_corpus([str(first[0])], tok, tmp_path, seq_len=64, txt_mode="blocks", progress=False)
    before = _files(tmp_path)
    shard_corpus([str(first[0])], tok, tmp_path, seq_len=64, txt_mode="blocks", progress=False)
    assert _files(tmp_path) == before  # nothing left to do, same manifest
    with pytest.raises(TokenizationError, match="seq_len differ"):
        shard_corpus([str(first[0])], tok, tmp_path, seq_len=32, txt_mode="blocks", progress=False)

"""Input without text is an error of `distill tokenize shard`, never a folder of 0 shards that looks complete.

Run as the real command (a subprocess): exit 2, one message naming the file(s) and what was expected, no
traceback, and no manifest (for an empty file, nothing written at all).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.tokenization_corpus import make_documents
from tokenization.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("empty")
    good = root / "good.jsonl"
    good.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(40, seed=3)), encoding="utf-8")
    tok = root / "tokenizer.json"
    train_tokenizer([good], 300, out_path=tok)
    return root, good, tok


def _shard(inputs: list[Path], tok: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "tokenize", "shard", "--input", *map(str, inputs),
                           "--tokenizer", str(tok), "--out", str(out), "--seq-len", "16", "--no-progress", *extra],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def _one_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill: error: "), done.stderr
    return lines[0]


def test_empty_files_are_named_and_nothing_is_written(setup, tmp_path):
    root, good, tok = setup
    empties = [tmp_path / "a.jsonl", tmp_path / "b.txt"]
    for path in empties:
        path.write_bytes(b"")
    out = tmp_path / "out"
    message = _one_error(_shard([good, *empties], tok, out))
    assert f"{empties[0]}, {empties[1]}: empty input files; expected text in every input file" in message
    assert not out.exists()


@pytest.mark.parametrize("split", ["0", "64"])
def test_a_file_without_documents_is_named_and_no_manifest_written(setup, tmp_path, split):
    """Blank lines and empty texts only: read whole (split 0) it fails in its part, split it fails at the end."""
    root, good, tok = setup
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n".join(['{"text": ""}', "", "  ", '{"text": "", "id": 2}'] * 8) + "\n")
    out = tmp_path / "out"
    message = _one_error(_shard([good, blank], tok, out, "--split-bytes", split))
    assert f"{blank}: no documents in this input file (expected a line with a non-empty 'text' field)" in message
    assert not (out / "manifest.json").exists()
    records = [json.loads(p.read_text()) for p in (out / "_progress").glob("0*.json")]
    if split == "0":  # the blank file's part left no done record and no shard; the good file's part is kept
        assert [r["input"] for r in records] == [str(good)]
        assert {p.name[:5] for p in out.glob("*.tar.gz")} == {"00000"}
    else:
        assert len(records) > 2 and all(r["documents"] == 0 for r in records if r["input"] == str(blank))


def test_too_little_text_for_one_sample_is_an_error(setup, tmp_path, capsys):
    root, _, tok = setup
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "ka lo"}\n')
    out = tmp_path / "out"
    assert main(["tokenize", "shard", "--input", str(short), "--tokenizer", str(tok), "--out", str(out),
                 "--seq-len", "64", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{out}: the input holds" in err and "too few for one sample of seq_len + 1 = 65 tokens" in err
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar.gz"))

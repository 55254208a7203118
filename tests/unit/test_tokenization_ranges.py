"""`distill tokenize shard --files START:STOP`: job array slices sharing one folder give what one run gives.

The manifest records the command without `--files` (whichever task writes it, it describes the whole folder),
so the only byte difference from a single run in another folder is the `--out` path inside `command`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.tokenization_corpus import make_documents, write_blocks
from tokenization import format as fmt
from tokenization.errors import TokenizationError
from tokenization.shards import PROGRESS_DIR, ShardJob, _check_job, shard_corpus
from tokenization.tokenizer import train_tokenizer
from tokenization.verify import verify_shards

REPO = Path(__file__).resolve().parents[2]
FILES = 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranges")
    inputs = root / "inputs"
    inputs.mkdir()
    for i in range(FILES):
        write_blocks(inputs / f"part{i:02d}.txt", make_documents(60, seed=i, words=(10, 60)))
    tok = root / "tokenizer.json"
    train_tokenizer([inputs / "part00.txt"], 500, out_path=tok, txt_mode="blocks")
    full = root / "full"
    assert main(_args(inputs, tok, full)) == 0
    return inputs, tok, full


def _args(inputs: Path, tok: Path, out: Path, *extra: str) -> list[str]:
    return ["tokenize", "shard", "--input", str(inputs / "*.txt"), "--tokenizer", str(tok), "--out", str(out),
            "--seq-len", "32", "--txt-mode", "blocks", "--shard-max-samples", "20", "--no-progress", *extra]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name → bytes), the manifest's command line taken out."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    if "manifest.json" in files:
        manifest = json.loads(files["manifest.json"])
        files["command"] = manifest.pop("command").encode()
        files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def _same_as_full(folder: Path, full: Path) -> None:
    got, want = _files(folder), _files(full)
    assert sorted(got) == sorted(want)
    assert {k: v for k, v in got.items() if k != "command"} == {k: v for k, v in want.items() if k != "command"}
    assert got["command"].decode() == want["command"].decode().replace(str(full), str(folder))
    assert "--files" not in got["command"].decode()
    assert verify_shards(folder) == []


def test_ranges_one_after_the_other_equal_one_run(corpus, tmp_path, capsys):
    inputs, tok, full = corpus
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(_args(inputs, tok, out, "--files", "0:2")) == 0
    said = capsys.readouterr().out
    assert "tokenized parts 0-1 of 5; 3 parts still missing" in said and "the manifest is written by" in said
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.tar.gz")) and all(p.name < "00002" for p in out.glob("*.tar.gz"))
    assert main(_args(inputs, tok, out, "--files=2:3")) == 0
    assert "tokenized part 2 of 5; 2 parts still missing" in capsys.readouterr().out
    assert not (out / "manifest.json").exists()
    assert main(_args(inputs, tok, out, "--fi", "3:64")) == 0  # STOP clipped; an abbreviation is still dropped
    assert "wrote" in capsys.readouterr().out
    _same_as_full(out, full)
    before = _files(out)
    assert main(_args(inputs, tok, out, "--files", "7:9")) == 0  # nothing in range, the folder complete
    assert _files(out) == before


def test_concurrent_ranges_in_two_processes_equal_one_run(corpus, tmp_path):
    inputs, tok, full = corpus
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", *_args(inputs, tok, out, "--files", r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ("0:3", "3:5")]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), results
    assert any("wrote" in stdout for _, stdout, _ in results)
    _same_as_full(out, full)


def test_array_tasks_split_the_files(corpus, tmp_path, capsys, monkeypatch):
    inputs, tok, full = corpus
    out = tmp_path / "out"
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "7")  # more tasks than files: some get nothing
    for task in (6, 0, 3, 1, 5, 2, 4):
        assert not (out / "manifest.json").exists()
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        assert main(_args(inputs, tok, out, "--files", "array")) == 0
    _same_as_full(out, full)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    capsys.readouterr()
    assert main(_args(inputs, tok, tmp_path / "other", "--files", "array")) == 2
    assert "--files: 'array' takes this task's share" in capsys.readouterr().err


def test_range_beyond_the_files_does_nothing(corpus, tmp_path, capsys):
    inputs, tok, _ = corpus
    out = tmp_path / "out"
    assert main(_args(inputs, tok, out, "--files", "5:8")) == 0
    assert "no parts in range 5:8 (5 parts); 5 parts still missing" in capsys.readouterr().out
    assert not list(out.glob("*.tar.gz")) and not (out / "manifest.json").exists()
    assert shard_corpus([str(inputs / "*.txt")], tok, out, seq_len=32, txt_mode="blocks", shard_max_samples=20,
                        progress=False, part_range=(2, 2)) is None
    assert not list(out.glob("*.tar.gz")) and not list((out / PROGRESS_DIR).glob("0*.json"))


@pytest.mark.parametrize("bad", ["3:1", "-1:2", "1", "a:b", "1:2:3"])
def test_bad_ranges_are_errors(corpus, tmp_path, capsys, bad):
    inputs, tok, _ = corpus
    try:
        status = main(_args(inputs, tok, tmp_path / "out", f"--files={bad}"))
    except SystemExit as stop:  # argparse: not START:STOP
        status = stop.code
    assert status == 2
    err = capsys.readouterr().err
    assert ("expected 0 ≤ START ≤ STOP" in err) if bad in ("3:1", "-1:2") else ("expected START:STOP" in err)
    assert not list(tmp_path.glob("out/*.tar.gz"))
    with pytest.raises(TokenizationError, match="part range 3:1"):
        shard_corpus([str(inputs / "*.txt")], tok, tmp_path / "api", seq_len=32, part_range=(3, 1), progress=False)


def test_job_record_made_concurrently_is_created_once(tmp_path):
    job = ShardJob(("a.txt",), "tok.json", "fp", 32)
    errors: list[BaseException] = []

    def check(j: ShardJob) -> None:
        try:
            _check_job(tmp_path, j)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=check, args=(job,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads((tmp_path / PROGRESS_DIR / "job.json").read_text())["seq_len"] == 32
    assert [p.name for p in (tmp_path / PROGRESS_DIR).iterdir()] == ["job.json"]  # no temporary files left
    with pytest.raises(TokenizationError, match="seq_len differ"):
        _check_job(tmp_path, ShardJob(("a.txt",), "tok.json", "fp", 64))


def test_manifest_command_has_no_files_option(corpus):
    _, _, full = corpus
    assert "--files" not in fmt.read_manifest(full).command

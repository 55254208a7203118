"""Every command in README.md runs: the walkthrough, the TensorBoard line and the config lines here; the rest
where this test says (and checks that it is).

The README's ```bash blocks are read from the file itself, so an edited command is the command tested. They
run with bash from a scratch folder that links the checkout's .venv, configs/, data/ and launchers/, exactly
as a user in the repository root types them. Each block is classified by its first command; a block that fits
no class fails the test, so a new README command cannot go untested.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
LINKED = ("configs", "data", "launchers")


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)


def first_command(block: str) -> str:
    line = next(line for line in block.splitlines() if line.strip() and not line.startswith("#"))
    return line.split()[0]


def classify(block: str) -> str:
    head = first_command(block)
    if head.startswith("SMALL="):
        return "walkthrough"
    if head == ".venv/bin/tensorboard":
        return "tensorboard"
    if head == "make":
        return "make"
    if head == "sbatch":
        return "sbatch"
    if all(line.startswith(".venv/bin/distill config ") for line in block.splitlines() if line.strip()):
        return "config"
    if all(line.startswith(".venv/bin/python benchmarks/") for line in block.splitlines() if line.strip()):
        return "benchmark"
    return f"unclassified: {head}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A scratch folder that looks like the repository root: .venv (this interpreter's) and the data it needs."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".venv").symlink_to(Path(sys.prefix))
    for name in LINKED:
        (folder / name).symlink_to(ROOT / name)
    return folder


def _bash(block: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_every_block_is_tested_somewhere():
    kinds = [classify(block) for block in bash_blocks()]
    assert not [kind for kind in kinds if kind.startswith("unclassified")], kinds
    assert {"walkthrough", "tensorboard", "make", "sbatch", "config", "benchmark"} <= set(kinds)


def test_make_targets_are_run():
    """`make test` is what .ci/run runs; `make demo` is run by tests/e2e/test_quickstart.py (as a smoke run)."""
    block = next(b for b in bash_blocks() if classify(b) == "make")
    targets = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert targets == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert '"demo", f"DEMO_ARGS=--smoke' in (ROOT / "tests" / "e2e" / "test_quickstart.py").read_text()


def test_benchmark_commands_parse(workdir):
    """Each benchmark command, with --help appended: the script imports and every option before it parses.

    The benchmarks themselves take minutes each (their figures are in the README and benchmarks/README.md);
    the suite does not time anything.
    """
    for name in ("benchmarks", "tests"):  # the benchmarks reuse the test kit
        (workdir / name).symlink_to(ROOT / name)
    for block in (b for b in bash_blocks() if classify(b) == "benchmark"):
        for line in block.splitlines():
            command = line.split("#")[0].strip()
            if command:
                done = _bash(command + " --help", workdir, timeout=120)
                assert done.returncode == 0 and "usage:" in done.stdout, (command, done.stderr[-2000:])


def test_sbatch_scripts_are_the_ones_submitted_to_slurm():
    """The sbatch lines use the scripts tests/slurm/test_multinode.py submits to a real Slurm (with toy sizes)."""
    block = next(b for b in bash_blocks() if classify(b) == "sbatch")
    scripts = re.findall(r"slurm/\w+\.sbatch", block)
    submitted = (ROOT / "tests" / "slurm" / "test_multinode.py").read_text()
    assert len(scripts) == 3 and all(f'"{script}"' in submitted for script in scripts), scripts


@pytest.fixture(scope="module")
def walkthrough(workdir) -> subprocess.CompletedProcess:
    block = next(b for b in bash_blocks() if classify(b) == "walkthrough")
    return _bash(block, workdir)


def test_walkthrough_runs_as_written(walkthrough, workdir):
    assert walkthrough.returncode == 0, walkthrough.stdout[-3000:] + walkthrough.stderr[-3000:]
    work = workdir / "work"
    assert json.loads((work / "cache" / "heldout" / "manifest.json").read_text())["extra"]["targets"]["mode"] == "topk"
    assert (work / "kd_hf" / "config.json").exists() and (work / "kd_hf" / "tokenizer.json").exists()
    assert (work / "kd_2ranks" / "checkpoints" / "latest").exists()
    metrics = [json.loads(line) for line in (work / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert [row for row in metrics if row.get("kind") == "eval" and "eval/divergence" in row]


def test_tensorboard_serves_the_walkthrough_run(walkthrough, workdir):
    block = next(b for b in bash_blocks() if classify(b) == "tensorboard")
    server = subprocess.Popen(["bash", "-c", "exec " + block.strip()], cwd=workdir, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            found = re.search(r"(http://\S+?)/? ", line + " ")
            url = found.group(1) if found and "localhost" in found.group(1) else None
            assert line or server.poll() is None, "tensorboard exited"
        assert url, "tensorboard printed no address"
        runs = json.loads(urllib.request.urlopen(f"{url}/data/runs", timeout=30).read())
        assert runs, "tensorboard found no run under the logdir"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_config_lines_run_and_the_reference_is_the_readmes(workdir):
    block = next(b for b in bash_blocks() if classify(b) == "config")
    for line in block.splitlines():
        command = line.split("#")[0].strip()
        if command:
            done = _bash(command, workdir, timeout=120)
            assert done.returncode == 0, (command, done.stderr)
            if "--reference" in command:
                assert done.stdout.strip().splitlines()[2] in README.read_text()

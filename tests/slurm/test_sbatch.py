"""The project's sbatch scripts, submitted to a real Slurm started on this machine (tests/slurm/cluster.py).

One module-scoped pipeline on a generated corpus, each stage through its own script on CPU:
tokenize.sbatch as a job array (train) and a single task (held-out), cache_teacher.sbatch as a job
array (train) and as one two-rank job (held-out), train_student.sbatch with two ranks. Then:
outputs verify (verify-shards, verify-cache), the student has a checkpoint and TensorBoard events, and
a student job signalled with `scancel --signal=USR1 --batch` checkpoints, is requeued, resumes and ends
with the same losses and final weights as the uninterrupted job. Skipped, saying so, only where Slurm
is missing and apt-get cannot install it.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.train.monitor import read_scalars
from tests.modelmaker import make_hf_model
from tests.slurm.cluster import SlurmCluster, install_reason
from tests.tokenization_corpus import make_documents, write_blocks
from tests.trainkit import STUDENT, final_weights, logged_steps, losses

ROOT = Path(__file__).resolve().parents[2]
CPU = ("--gpus-per-node=0", "--cpus-per-task=1")
STEPS = 120

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = install_reason()
    if reason:
        pytest.skip(f"no Slurm for tests/slurm: {reason}")
    cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def _distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _run(cluster, script: str, *args: str, options=()) -> str:
    job = cluster.sbatch(script, *args, options=(*CPU, *options), cwd=ROOT)
    states = cluster.wait(job)
    assert set(states) == {"COMPLETED"}, f"{script} job {job}: {states}"
    return job


@pytest.fixture(scope="module")
def pipeline_dirs(cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm_pipeline")
    corpus = folder / "corpus"
    corpus.mkdir()
    for i in range(5):
        write_blocks(corpus / f"train-{i}.txt", make_documents(60, seed=i))
    write_blocks(corpus / "heldout.txt", make_documents(40, seed=99))
    tok = folder / "tok.json"
    made = _distill("tokenize", "train-tokenizer", "--input", str(corpus / "*.txt"), "--txt-mode", "blocks",
                    "--vocab-size", "300", "--out", str(tok))
    assert made.returncode == 0, made.stderr
    shard_args = ("--txt-mode", "blocks", "--tokenizer", str(tok), "--seq-len", "32", "--shard-max-samples", "40")
    logs = ("--output", str(folder / "%x-%A_%a.out"))
    _run(cluster, "slurm/tokenize.sbatch", "--input", str(corpus / "train-*.txt"), "--out", str(folder / "train"),
         *shard_args, options=("--array=0-2", *logs))
    _run(cluster, "slurm/tokenize.sbatch", "--input", str(corpus / "heldout.txt"), "--out", str(folder / "heldout"),
         *shard_args, options=logs)
    make_hf_model("llama_gqa", folder / "teacher", seed=0)
    cache = ("--config", "configs/cache_topk.yaml", f"teacher={folder / 'teacher'}", "targets.k=8", "progress=false")
    _run(cluster, "slurm/cache_teacher.sbatch", *cache, f"tokens={folder / 'train'}", f"output={folder / 'cache'}",
         options=("--array=0-1", "--ntasks-per-node=1", *logs))
    _run(cluster, "slurm/cache_teacher.sbatch", *cache, f"tokens={folder / 'heldout'}",
         f"output={folder / 'cache_heldout'}", options=("--ntasks-per-node=2", *logs))
    return folder


def _student(folder: Path, name: str) -> tuple[str, ...]:
    return ("--config", "configs/student_kd.yaml", f"run_dir={folder / name}", f"data.tokens={folder / 'train'}",
            f"data.teacher_cache={folder / 'cache'}", f"data.eval_tokens={folder / 'heldout'}",
            f"data.eval_teacher_cache={folder / 'cache_heldout'}", f"data.tokenizer={folder / 'tok.json'}",
            *STUDENT, f"schedule.steps={STEPS}", "schedule.micro_batch=2", "data.num_workers=0",
            "optim.warmup_steps=5", "optim.lr=0.003", "checkpoint.every=0", "eval.every=0", "eval.batches=2",
            "log.console_every=20")


def test_tokenize_and_cache_jobs_write_outputs_that_verify(pipeline_dirs):
    folder = pipeline_dirs
    for shards in ("train", "heldout"):
        checked = _distill("verify-shards", str(folder / shards))
        assert checked.returncode == 0, checked.stdout + checked.stderr
    assert len(list((folder / "train").glob("*.tar.gz"))) >= 3
    for cache, tokens in (("cache", "train"), ("cache_heldout", "heldout")):
        checked = _distill("verify-cache", str(folder / cache), "--tokens", str(folder / tokens),
                           "--teacher", str(folder / "teacher"), "--positions", "32")
        assert checked.returncode == 0, checked.stdout + checked.stderr
    logs = "".join(p.read_text() for p in folder.glob("distill-cache-*.out"))
    assert "array task" in logs and "commit " in logs and "resolved config:" in logs and "restart 0" in logs


@pytest.fixture(scope="module")
def whole_run(cluster, pipeline_dirs) -> Path:
    """The uninterrupted student job; its log is whole.out beside it."""
    _run(cluster, "slurm/train_student.sbatch", *_student(pipeline_dirs, "whole"),
         options=("--ntasks-per-node=2", "--output", str(pipeline_dirs / "whole.out")))
    return pipeline_dirs / "whole"


def test_student_job_trains_checkpoints_and_logs(whole_run):
    assert (whole_run / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    assert sorted(losses(whole_run)) == list(range(1, STEPS + 1))
    scalars = read_scalars(whole_run / "tensorboard")
    assert {"train/loss", "eval/perplexity", "perf/tokens_per_s"} <= set(scalars)
    text = (whole_run.parent / "whole.out").read_text()
    assert "layout: nodes 1" in text and "ranks 2" in text and "parallel:" in text and "restart 0" in text


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_end(cluster, pipeline_dirs, whole_run):
    folder = pipeline_dirs
    log = folder / "preempted.out"
    job = cluster.sbatch("slurm/train_student.sbatch", *_student(folder, "preempted"),
                         options=(*CPU, "--ntasks-per-node=2", "--output", str(log)), cwd=ROOT)
    _wait_for(lambda: logged_steps(folder / "preempted") >= 3, f"job {job} reaching step 3", cluster, job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster.env, check=True)
    _wait_for(lambda: cluster.job(job).get("Restarts") == "1" and cluster.states(job) == ["PENDING"],
              f"job {job} being requeued", cluster, job)
    saved = (folder / "preempted" / "checkpoints" / "latest").read_text()
    assert 3 <= int(saved.removeprefix("step_")) < STEPS
    cluster.release(job)
    assert cluster.wait(job) == ["COMPLETED"]
    text = log.read_text()
    assert "restart 0" in text and "restart 1" in text and "scontrol requeue" in text
    assert "resumed from" in text
    whole, resumed = losses(whole_run), losses(folder / "preempted")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, value in whole.items():
        assert resumed[step] == pytest.approx(value, rel=1e-6, abs=1e-7), f"step {step}"
    want = final_weights(whole_run, folder / "whole_hf")
    have = final_weights(folder / "preempted", folder / "preempted_hf")
    for key, tensor in want.items():
        assert (have[key] - tensor).abs().max() <= 1e-6, key


def _wait_for(condition, what: str, cluster, job: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; job state {cluster.states(job)}")
        time.sleep(0.05)

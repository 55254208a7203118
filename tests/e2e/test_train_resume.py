"""A training run survives SIGKILL and preemption without a trace, and refuses what it must refuse.

- SIGKILL after the checkpoint at step 8 of 16 (and after steps beyond it were logged): the rerun of
  the same command resumes from `latest` and finishes with the uninterrupted run's losses at every
  step and its final parameters, and its TensorBoard curves hold each step once (purge on resume).
- SIGUSR1 to one of two ranks: both stop after the same step, save, exit with REQUEUE_EXIT_CODE; the
  restart finishes equal to an uninterrupted two-rank run.
- Non-finite steps are skipped and counted, and the run stops with exit 2 past the limit.
- A run_dir whose checkpoint belongs to another model is refused by name; only `keep` checkpoints stay.
"""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from pipeline.train.monitor import read_scalars
from pipeline.train.preemption import REQUEUE_EXIT_CODE
from tests.harness import run_distributed
from tests.shardmaker import make_token_shards
from tests.trainkit import (final_weights, launch, logged_steps, losses, student_overrides, teacher_cache, train_config,
                            wait_for)

TAGS = ("train/loss", "train/kd_loss", "train/ce_loss", "train/top1_agreement", "train/lr", "train/grad_norm",
        "train/skipped_steps", "perf/tokens_per_s", "perf/step_time_s", "perf/data_wait_fraction",
        "perf/memory_gib", "data/consumed_tokens", "eval/perplexity", "eval/divergence", "eval/top1_agreement")


def _train(rank: int, world: int, overrides: list) -> int:
    from pipeline.train.run import run_training

    return run_training(train_config(overrides))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_resume")
    tokens, heldout = folder / "tokens", folder / "heldout"
    make_token_shards(tokens, [40, 40], seq_len=32, vocab_size=300, seed=0)
    make_token_shards(heldout, [8], seq_len=32, vocab_size=300, seed=5)
    return folder, tokens, teacher_cache(folder, tokens), teacher_cache(folder / "eval", heldout)


def _overrides(data, name: str, **extra) -> list[str]:
    folder, tokens, cache, eval_cache = data
    return student_overrides(folder / name, tokens, cache, data__eval_tokens=folder / "heldout",
                             data__eval_teacher_cache=eval_cache, eval__batches=2, **extra)


def _assert_same_run(got, expected, steps: int) -> None:
    assert sorted(losses(got)) == list(range(1, steps + 1))
    for step, value in losses(expected).items():
        assert losses(got)[step] == pytest.approx(value, rel=1e-6, abs=1e-7), f"step {step}"
    want = final_weights(expected, expected.parent / f"{expected.name}_hf")
    have = final_weights(got, got.parent / f"{got.name}_hf")
    for key, tensor in want.items():
        assert (have[key] - tensor).abs().max() <= 1e-6, key


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(data):
    folder = data[0]
    steps = dict(steps=16, checkpoint__every=8, eval__every=8)
    assert run_distributed(_train, 1, _overrides(data, "whole", **steps)) == [0]
    killed = _overrides(data, "killed", **steps)
    procs = launch(killed)
    run = folder / "killed"
    wait_for(procs, lambda: (run / "checkpoints" / "latest").is_file() and logged_steps(run) >= 10, "step 10")
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000008"
    assert run_distributed(_train, 1, killed) == [0]
    _assert_same_run(run, folder / "whole", 16)
    scalars = read_scalars(run / "tensorboard")
    assert set(TAGS) <= set(scalars), sorted(set(TAGS) - set(scalars))
    for tag in TAGS:
        steps_logged = [step for step, _ in scalars[tag]]
        expected = [8, 16] if tag.startswith("eval/") else list(range(1, 17))
        assert steps_logged == expected, f"{tag}: {steps_logged}"


@pytest.mark.slow
def test_sigusr1_on_one_rank_checkpoints_requeues_and_resumes_equal(data):
    folder = data[0]
    assert run_distributed(_train, 2, _overrides(data, "whole2", steps=12)) == [0, 0]
    preempted = _overrides(data, "preempted", steps=12)
    procs = launch(preempted, world=2)
    wait_for(procs, lambda: logged_steps(folder / "preempted") >= 3, "step 3")
    procs[1].send_signal(signal.SIGUSR1)
    assert [p.wait(timeout=240) for p in procs] == [REQUEUE_EXIT_CODE] * 2
    tag = (folder / "preempted" / "checkpoints" / "latest").read_text()
    assert 3 <= int(tag.removeprefix("step_")) < 12
    assert run_distributed(_train, 2, preempted) == [0, 0]
    _assert_same_run(folder / "preempted", folder / "whole2", 12)


def _cli(overrides: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "train", *overrides], capture_output=True, text=True,
                          timeout=300)


def test_nonfinite_steps_are_skipped_then_stop_the_run(data):
    result = _cli(_overrides(data, "nonfinite", steps=8, optim__lr=1e4, optim__grad_clip=0,
                             schedule__max_nonfinite_steps=1))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "non-finite loss or gradient, more than schedule.max_nonfinite_steps=1" in result.stderr


def test_checkpoints_kept_and_another_model_refused(data):
    folder = data[0]
    first = _overrides(data, "kept", steps=8, checkpoint__every=2, checkpoint__keep=2)
    assert _cli(first).returncode == 0
    kept = sorted(p.name for p in (folder / "kept" / "checkpoints").glob("step_*"))
    assert kept == ["step_00000006", "step_00000008"]
    result = _cli(first + ["model.hidden_size=32"])
    assert result.returncode == 2
    assert "belongs to another run" in result.stderr and "model:" in result.stderr, result.stderr[-2000:]
    assert sorted(p.name for p in (folder / "kept" / "checkpoints").glob("step_*")) == kept

"""Whole `distill train` runs with an online teacher and generated prefixes: DP 1 = DP 2, the generation
metrics, and an exact resume after SIGKILL during an on-policy step.

The token shards declare EOS id 300, one past the 300 ids the models score, so no continuation stops
early: each generated row has exactly seq_len + 1 − prompt_len new tokens, and a step's token counts are
known in advance (rows per source × that).

- DP 1 × grad_accumulation 2 and DP 2 × 1 see the same 4 samples per step: a 2-step word-level KL phase
  on the data, then TVD on half teacher-, half student-sampled prefixes. Each micro-batch's rows take
  their source and draws from their keys and the step only, so both layouts generate the same rows and
  give the same losses (to 1e-6), and both log the whole step's generated tokens (summed over DP).
- A 2-step KL phase on the data, then reverse KL on the student's own samples: SIGKILL once steps past
  the checkpoint at step 4 are logged, while the next on-policy step decodes (the student's decoding is
  most of such a step); the rerun resumes from the checkpoint and logs the uninterrupted run's losses at
  every step. Nothing about generation is saved: the draws are seeded by (seed, sample key, step), and
  the step (which also places the run in its phase) is in the checkpoint.
"""
from __future__ import annotations

import json
import signal

import pytest

from pipeline.train.monitor import read_metrics, read_scalars
from tests.harness import run_distributed
from tests.modelmaker import make_hf_model
from tests.shardmaker import make_token_shards
from tests.trainkit import launch, logged_steps, losses, student_overrides, train_config, wait_for

SEQ_LEN = 16
PROMPT = 4
NEW = SEQ_LEN + 1 - PROMPT  # new tokens per generated row: EOS is never drawn
GENERATION = ("perf/generate_teacher_s", "perf/generate_student_s", "data/generated_teacher_tokens",
              "data/generated_student_tokens")


def _train(rank: int, world: int, runs: list) -> list:
    from pipeline.train.run import run_training

    return [run_training(train_config(overrides)) for overrides in runs]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_online")
    tokens = folder / "tokens"
    make_token_shards(tokens, [20, 20], seq_len=SEQ_LEN, vocab_size=300, seed=0)
    manifest = json.loads((tokens / "manifest.json").read_text())
    (tokens / "manifest.json").write_text(json.dumps(dict(manifest, eos_id=300)))  # never drawn: see above
    make_hf_model("llama_gqa", folder / "teacher", seed=0)
    return folder, tokens


def _overrides(data, name: str, divergence: str = "tvd", **extra) -> list[str]:
    folder, tokens = data
    return student_overrides(folder / name, tokens, teacher__online=folder / "teacher",
                             loss__prefixes__prompt_len=PROMPT, **extra) + [f"loss.divergence={divergence}"]


@pytest.mark.dist
def test_dp2_matches_dp1_and_logs_generation(data):
    folder = data[0]
    schedule = dict(steps=5, loss__phases="[{steps: 2, divergence: kl}]", loss__prefixes__teacher=0.5,
                    loss__prefixes__student=0.5)
    dp1 = _overrides(data, "dp1", grad_accumulation=2, **schedule)
    dp2 = _overrides(data, "dp2", grad_accumulation=1, **schedule)
    assert run_distributed(_train, 1, [dp1]) == [[0]]
    assert run_distributed(_train, 2, [dp2]) == [[0], [0]]
    curves = {name: losses(folder / name) for name in ("dp1", "dp2")}
    assert sorted(curves["dp1"]) == [1, 2, 3, 4, 5]
    for step, value in curves["dp1"].items():
        assert curves["dp2"][step] == pytest.approx(value, rel=1e-6), f"step {step}"
    for name in ("dp1", "dp2"):
        rows = {row["step"]: row for row in read_metrics(folder / name) if "train/loss" in row}
        for step, row in rows.items():
            assert row["perf/teacher_s"] > 0, f"{name} step {step}"  # the online teacher scores every step
            if step <= 2:  # the word-level phase generates nothing
                assert not set(GENERATION) & set(row), f"{name} step {step}"
                continue
            assert set(GENERATION) <= set(row), f"{name} step {step}: {sorted(set(GENERATION) - set(row))}"
            # 4 samples a step: 2 continued by the teacher, 2 by the student, NEW tokens each
            assert row["data/generated_teacher_tokens"] == 2 * NEW, f"{name} step {step}"
            assert row["data/generated_student_tokens"] == 2 * NEW, f"{name} step {step}"
            assert row["perf/generate_teacher_s"] > 0 and row["perf/generate_student_s"] > 0
            # the loss counts the generated labels only: NEW of each row's SEQ_LEN positions
            assert row["data/consumed_tokens"] - rows.get(step - 1, {}).get("data/consumed_tokens", 0) == 4 * NEW
    scalars = read_scalars(folder / "dp1" / "tensorboard")
    for tag in GENERATION:
        assert [step for step, _ in scalars[tag]] == [3, 4, 5], tag
    assert [step for step, _ in scalars["perf/teacher_s"]] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_resume_after_sigkill_during_on_policy_step_equals_uninterrupted_run(data):
    folder = data[0]
    steps = dict(steps=8, checkpoint__every=4, divergence="rkl", loss__prefixes__student=1.0,
                 loss__phases="[{steps: 2, divergence: kl}]")  # the schedule resumes too
    assert run_distributed(_train, 1, [_overrides(data, "whole", **steps)]) == [[0]]
    killed = _overrides(data, "killed", **steps)
    procs = launch(killed)
    run = folder / "killed"
    wait_for(procs, lambda: (run / "checkpoints" / "latest").is_file() and logged_steps(run) >= 5, "step 5")
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    assert run_distributed(_train, 1, [killed]) == [[0]]
    whole = losses(folder / "whole")
    assert sorted(losses(run)) == list(range(1, 9))
    for step, value in whole.items():
        assert losses(run)[step] == pytest.approx(value, rel=1e-6, abs=1e-7), f"step {step}"
    generated = losses(run, "data/generated_student_tokens")
    assert generated == {step: 2 * NEW for step in range(3, 9)}

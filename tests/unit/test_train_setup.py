"""The trainer's checks and generated settings, without training: what a wrong config is told, what
DeepSpeed is given, the learning-rate schedule, and the identity a checkpoint is resumed under."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest

from pipeline.config import TrainConfig, load_config
from pipeline.train.checkpoints import identity_differences
from pipeline.train.deepspeed_config import deepspeed_config, lr_factor, merge
from pipeline.train.errors import TrainError
from pipeline.train.setup import check_settings
from tests.shardmaker import make_token_shards
from tests.trainkit import student_overrides, teacher_cache, train_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_setup")
    tokens = folder / "tokens"
    make_token_shards(tokens, [8], seq_len=8, vocab_size=300, seed=0)
    return folder, tokens, teacher_cache(folder, tokens), teacher_cache(folder, tokens, mode="sampled")


def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    factors = [lr_factor(step, warmup=4, total=20, floor=0.1) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[4 + 15 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert lr_factor(0, warmup=0, total=1, floor=0.0) == 1.0


def test_deepspeed_config_follows_the_typed_config_and_merges_overrides():
    cfg = load_config(TrainConfig, None, [
        "schedule.micro_batch=3", "schedule.grad_accumulation=5", "optim.lr=0.002", "optim.grad_clip=0.5",
        "deepspeed.zero_optimization.stage3_max_live_parameters=7", "deepspeed.wall_clock_breakdown=true"])
    import torch

    ds = deepspeed_config(cfg, torch.bfloat16)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5 and ds["optimizer"]["params"]["lr"] == 0.002
    assert ds["zero_optimization"] == {"stage": 3, "stage3_max_live_parameters": 7}
    assert ds["bf16"]["enabled"] and ds["wall_clock_breakdown"] is True
    assert not deepspeed_config(cfg, torch.float32)["bf16"]["enabled"]
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}


@pytest.mark.parametrize("extra, needle", [
    (["data.teacher_cache=''"], "needs a teacher"),
    (["run_dir=''"], "run_dir: is required"),
    (["model.vocab_size=200"], "model.vocab_size=200 is smaller than the vocabulary"),
    (["loss.temperature=2.0"], "was written at temperature 1.0"),
    (["data.eval_teacher_cache=x"], "data.eval_tokens is empty"),
    (["eval.teacher=x"], "eval.teacher is set .* data.eval_tokens is empty"),
])
def test_wrong_settings_are_refused_by_name(data, tmp_path, extra, needle):
    folder, tokens, cache, _ = data
    with pytest.raises(TrainError, match=needle):
        check_settings(train_config(student_overrides(tmp_path / "run", tokens, cache) + extra))


def test_sampled_targets_only_with_forward_kl(data, tmp_path):
    folder, tokens, _, sampled = data
    check_settings(train_config(student_overrides(tmp_path / "run", tokens, sampled)))
    with pytest.raises(TrainError, match="sampled cache"):
        check_settings(train_config(student_overrides(tmp_path / "run", tokens, sampled) + ["loss.divergence=js"]))


def test_identity_differences_name_each_key():
    assert identity_differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b: saved 2, now 3",
                                                                              "c: saved None, now 4"]


def test_cli_help_and_bad_export_path(tmp_path):
    run = [sys.executable, "-m", "pipeline"]
    helped = subprocess.run(run + ["train", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "status 75" in helped.stdout and "resumes" in helped.stdout
    failed = subprocess.run(run + ["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "hf")],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and str(tmp_path) in failed.stderr


def test_too_little_data_for_one_step_names_the_folder(tmp_path):
    from pipeline.train.stream import make_dataset

    make_token_shards(tmp_path / "few", [3], seq_len=8, vocab_size=300)
    cfg = train_config(student_overrides(tmp_path / "run", tmp_path / "few", micro_batch=2))
    with pytest.raises(TrainError, match=f"{tmp_path / 'few'}: 3 samples per epoch cannot fill one step"):
        make_dataset(str(tmp_path / "few"), "", cfg, rank=0, size=2, shuffle=False)


def test_the_held_out_cache_is_a_ruler_not_a_loss_target(data, tmp_path):
    """Eval measures every run on the same held-out cache: a run whose loss is js, or at another temperature, may
    evaluate on a sampled or T=1 cache, while the cache it trains on must still suit its loss."""
    folder, tokens, cache, sampled = data
    warm = teacher_cache(folder, tokens, temperature=2.0)
    base = student_overrides(tmp_path / "run", tokens, warm) + ["loss.temperature=2.0", f"data.eval_tokens={tokens}"]
    check_settings(train_config(base + [f"data.eval_teacher_cache={cache}"]))
    check_settings(train_config(base + [f"data.eval_teacher_cache={sampled}", "loss.divergence=js"]))
    with pytest.raises(TrainError, match="was written at temperature 2.0"):
        check_settings(train_config(student_overrides(tmp_path / "run", tokens, warm) + [
            f"data.eval_tokens={tokens}", f"data.eval_teacher_cache={cache}"]))

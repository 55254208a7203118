"""`distill train` with the intermediate-state loss: its learned map trains with the student, resumes, never exports.

A width-32 student learns from an online width-64 teacher with `teacher.hidden_weight` set, so the student
carries the learned map. The run logs train/hidden_loss at every step; the DeepSpeed checkpoint holds the map
(moved away from its seeded start by the optimizer), the Hugging Face export holds exactly the student's
tensors and no map; a run resumed from the step-2 checkpoint finishes with the uninterrupted run's losses
(hidden loss included) and map, which only a restored map gives; and a resume with the loss switched off is
refused by name (its checkpoint holds a map the new run would not build).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from pipeline.model.layout import hf_shapes
from pipeline.online.hidden import MAP_NAME, initial_map
from tests.harness import run_distributed
from tests.modelmaker import make_hf_model
from tests.shardmaker import make_token_shards
from tests.trainkit import final_weights, losses, student_overrides, train_config

MAP = f"{MAP_NAME}.weight"


def _runs(rank: int, world: int, runs: list) -> list:
    """run_training for each overrides list; a TrainError's message instead of an exit code."""
    from pipeline.train.errors import TrainError
    from pipeline.train.run import run_training

    results = []
    for overrides in runs:
        try:
            results.append(run_training(train_config(overrides)))
        except TrainError as err:
            results.append(str(err))
    return results


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_hidden")
    make_token_shards(folder / "tokens", [24], seq_len=16, vocab_size=300, seed=0)
    make_hf_model("llama_gqa", folder / "teacher", seed=2)
    return folder


def hidden_overrides(folder: Path, name: str, **extra) -> list[str]:
    """A width-32 student (the teacher is width 64) trained with kl + the intermediate-state loss."""
    settings = dict(steps=4, loss__divergence="kl", teacher__online=folder / "teacher", teacher__hidden_weight=0.5,
                    teacher__student_layers="[1,2]", teacher__teacher_layers="[1,2]", model__hidden_size=32,
                    model__intermediate_size=64)
    return student_overrides(folder / name, folder / "tokens", **{**settings, **extra})


def checkpoint_state(run_dir: Path, tp_rank: int = 0) -> dict:
    """Every parameter of the latest DeepSpeed checkpoint of TP rank `tp_rank`, by megatron name (fp32)."""
    from pipeline.train.export import rank_files, read_run, resolve_tag_folder, _tp_rank_state

    tag = resolve_tag_folder(run_dir)
    _, layout, _ = read_run(tag)
    with tempfile.TemporaryDirectory() as scratch:
        state = _tp_rank_state(rank_files(tag, layout["tp"], layout["dp"])[tp_rank], Path(scratch), tp_rank)
        return {name: tensor.contiguous().clone() for name, tensor in state.items()}


def test_map_trains_resumes_and_stays_out_of_the_export(data):
    folder = data
    assert run_distributed(_runs, 1, [hidden_overrides(folder, "whole", checkpoint__every=2)]) == [[0]]
    checkpoints = folder / "resumed" / "checkpoints"
    shutil.copytree(folder / "whole", folder / "resumed")
    shutil.rmtree(checkpoints / "step_00000004")
    (checkpoints / "latest").write_text("step_00000002")
    off = hidden_overrides(folder, "whole", teacher__hidden_weight=0.0)
    refused, resumed = run_distributed(_runs, 1, [off, hidden_overrides(folder, "resumed", checkpoint__every=2)])[0]
    assert "hidden_map: saved [64, 32], now None" in refused
    assert resumed == 0

    for tag in ("train/loss", "train/hidden_loss"):
        curve = losses(folder / "whole", tag)
        assert sorted(curve) == [1, 2, 3, 4] and all(value > 0 for value in curve.values()), tag
        again = losses(folder / "resumed", tag)
        for step in (3, 4):
            assert again[step] == pytest.approx(curve[step], rel=1e-6, abs=1e-7), f"{tag} step {step}"
    hidden = losses(folder / "whole", "train/hidden_loss")
    assert hidden[4] < hidden[1], "the map and the student should learn to match the teacher's states"

    state = checkpoint_state(folder / "whole")
    cfg = train_config(hidden_overrides(folder, "whole"))
    assert tuple(state[MAP].shape) == (64, 32)
    assert (state[MAP] - initial_map([64, 32], cfg.seed)).abs().max() > 1e-3, "the optimizer must update the map"
    assert (checkpoint_state(folder / "resumed")[MAP] - state[MAP]).abs().max() <= 1e-6

    exported = final_weights(folder / "whole", folder / "whole_hf")
    assert set(exported) == set(hf_shapes(cfg.model.architecture_config()))
    assert not [name for name in exported if "map" in name]

"""A checkpoint resumes on another layout equal to an uninterrupted run at the new layout, and still refuses
another loss or global batch by name.

Global batch 4 samples of micro-batch 1 in every run. Each resharded run trains 2 steps at its first layout,
saves, and resumes with the same overrides (as a requeued job would, on fewer or more nodes) for 10 more:
DP 4 → 2 (grad_accumulation 1 → 2, derived), DP 2 → 4 (2 → 1), and TP 1 → 2 (tp 1 × dp 2 → tp 2 × dp 1,
grad_accumulation 2 → 4: TP reslicing and a DP merge at once). Each is compared, step by step, with a run
of 12 steps at its second layout from the start.

Tolerance: the two runs differ only in summation order, during the first 2 steps (gradients reduced over
another number of ranks and micro-batches, and for TP vocabulary and row-parallel products split another
way), after which the resumed run continues from those fp32 states. Losses agree within rel 1e-5 (as
test_train_equivalence's do across layouts) and parameters within 1e-5 after the DP changes. After the TP
change Adam's g/√v magnifies that rounding where a gradient is small (up to 2e-4 on the second layer's MLP
after 12 steps at lr 0.01), so there each parameter tensor must be no further (×1.1 + 1e-6, at most 1e-3)
from the uninterrupted TP-2 run than the uninterrupted TP-1 run is: resharding adds nothing of its own.
Gradient clipping is on at its default (optim.grad_clip=1), as in a real run. The TP reslicing is also
checked exactly: the TP-2 weights and Adam moments built from the TP-1 checkpoint join back into the TP-1
ones bit for bit. Plain CE loss keeps the test cheap: resharding does not depend on the loss.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.model.layout import hf_from_shards, hf_shapes, tensor_rules
from pipeline.parallel import pad_vocab_size
from pipeline.train import reshard
from tests.harness import run_distributed
from tests.modelmaker import read_safetensors
from tests.shardmaker import make_token_shards
from tests.trainkit import final_weights, losses, student_overrides, train_config

STEPS, SWITCH = 12, 2


def _train(rank: int, world: int, runs: list) -> list:
    from pipeline.train.errors import TrainError
    from pipeline.train.run import run_training

    out = []
    for overrides in runs:
        try:
            out.append(run_training(train_config(overrides)))
        except TrainError as err:
            out.append(str(err))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train_reshard")
    make_token_shards(folder / "tokens", [20, 20], seq_len=16, vocab_size=300, seed=0)
    return folder


def _run(folder, name: str, *, g: int, tp: int = 1, steps: int = STEPS, **extra) -> list[str]:
    return student_overrides(folder / name, folder / "tokens", steps=steps, micro_batch=1, grad_accumulation=g, tp=tp,
                             **extra)


def _weights(folder, run: str) -> dict:
    """The final parameters of `run`, exported once (a run can be the reference of two comparisons)."""
    out = folder / f"{run}_hf"
    return read_safetensors(out) if out.exists() else final_weights(folder / run, out)


def _assert_equal(folder, name: str, reference: str, *, old_layout: str | None = None) -> None:
    """`name` equals `reference` for the 10 steps after the switch; with `old_layout` (the uninterrupted run at the
    layout `name` started at) its parameters are no further from `reference` than that run's are."""
    got, want = losses(folder / name), losses(folder / reference)
    assert sorted(got) == list(range(1, STEPS + 1)), name
    for step in range(SWITCH + 1, STEPS + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"{name} step {step}"
    have, expected = _weights(folder, name), _weights(folder, reference)
    bound = {} if old_layout is None else _weights(folder, old_layout)
    assert have.keys() == expected.keys()
    for key, tensor in expected.items():
        diff = float((have[key] - tensor).abs().max())
        limit = 1e-5 if old_layout is None else 1.1 * float((bound[key] - tensor).abs().max()) + 1e-6
        assert diff <= min(limit, 1e-3), f"{name} {key}: differs by {diff:.2e}, more than {limit:.2e}"


def _shard_shape(rule, shape: tuple, padded: int, tp: int) -> tuple:
    if rule.split == "replicated":
        return shape
    if rule.split == "columns":
        return (shape[0], shape[1] // tp)
    return (padded // tp if rule.split == "vocab" else shape[0] // tp, *shape[1:])


def _assert_tp_reslice_exact(tag_folder, model) -> None:
    """The TP-2 states built from a TP-1 × DP-2 checkpoint join back into the TP-1 states (DeepSpeed's DP merge
    alone) exactly, for the fp32 weights and both Adam moments; the dropped vocabulary padding rows held zeros."""
    record = json.loads((tag_folder / "run.json").read_text())
    one, two = tag_folder.parent / "as_tp1", tag_folder.parent / "as_tp2"
    reshard.build(tag_folder, one, record, model, 1, 64)
    reshard.build(tag_folder, two, record, model, 2, 64)
    moved = 0.0
    for rule in tensor_rules(model):
        for state in reshard.STATES:
            whole = reshard.read_state(one / "tp_00" / "zero" / rule.megatron / f"{state}.pt")
            shape = (pad_vocab_size(300, 1, 64), 64) if rule.split == "vocab" else _shape(rule, model)
            whole = whole.view(shape)
            shards = [reshard.read_state(two / f"tp_{r:02d}" / "zero" / rule.megatron / f"{state}.pt")
                      .view(_shard_shape(rule, shape, pad_vocab_size(300, 2, 64), 2)) for r in range(2)]
            expected, got = hf_from_shards(rule, [whole], model), hf_from_shards(rule, shards, model)
            for name, tensor in expected.items():
                assert torch.equal(got[name], tensor), f"{rule.megatron} {state}: {name} differs"
            if rule.split == "vocab":
                assert not whole[300:].any(), f"{rule.megatron} {state}: padding rows are not zero"
            moved += float(expected[next(iter(expected))].abs().sum()) if state == "exp_avg" else 0.0
    assert moved > 0, "the checkpoint holds no Adam state"


def _shape(rule, model) -> tuple:
    """The unsplit megatron shape of `rule`'s parameter (fused QKV and gate/up stacked), from the HF shapes."""
    shapes = hf_shapes(model)
    if rule.split in ("replicated", "columns"):
        return shapes[rule.hf[0]]
    return (sum(shapes[name][0] for name in rule.hf), *shapes[rule.hf[0]][1:])


@pytest.mark.dist
@pytest.mark.slow
def test_resume_on_another_layout_equals_uninterrupted_run(data):
    folder = data
    dp2to4, dp4to2 = _run(folder, "dp2to4", g=2), _run(folder, "dp4to2", g=1)
    tp1to2 = _run(folder, "tp1to2", g=2)
    first = [o + [f"schedule.steps={SWITCH}"] for o in (dp2to4, dp4to2)]
    assert run_distributed(_train, 2, [first[0], _run(folder, "ref_dp2", g=2)]) == [[0, 0]] * 2
    shutil.copytree(folder / "dp2to4", folder / "tp1to2")  # the same first 2 steps at tp 1 × dp 2
    _assert_tp_reslice_exact(folder / "dp2to4" / "checkpoints" / "step_00000002", train_config(tp1to2).model)
    assert run_distributed(_train, 4, [first[1], dp2to4, _run(folder, "ref_dp4", g=1)]) == [[0, 0, 0]] * 4
    changed_loss = dp4to2 + ["loss.ce_weight=0.5"]
    bigger_batch = _run(folder, "dp4to2", g=4)
    results = run_distributed(_train, 2, [changed_loss, bigger_batch, dp4to2, tp1to2 + ["parallel.tp=2"],
                                          _run(folder, "ref_tp2", g=4, tp=2)])
    for loss, batch, *_ in results:
        assert "belongs to another run" in loss and "loss:" in loss and "'ce_weight': 0.5" in loss, loss
        assert "batch:" in batch and "'global_batch': 4" in batch and "'global_batch': 8" in batch, batch
    assert [r[2:] for r in results] == [[0, 0, 0]] * 2
    _assert_equal(folder, "dp4to2", "ref_dp2")
    _assert_equal(folder, "dp2to4", "ref_dp4")
    _assert_equal(folder, "tp1to2", "ref_tp2", old_layout="ref_dp2")  # ref_dp2 is tp 1 × dp 2, tp1to2's start
    assert not list((folder / "dp4to2" / "checkpoints").glob(".reshard*")), "the resharded folder was left behind"

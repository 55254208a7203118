"""The batch rule of a resume on another layout, and identities of checkpoints saved before it existed."""
from __future__ import annotations

import pytest

from pipeline.train.checkpoints import identity_differences
from pipeline.train.errors import TrainError
from pipeline.train.reshard import resume_grad_accumulation
from tests.trainkit import train_config


def _cfg(micro: int, g: int):
    return train_config(["run_dir=/nonexistent", "data.tokens=/nonexistent", f"schedule.micro_batch={micro}",
                         f"schedule.grad_accumulation={g}"])


def _record(micro: int, g: int, dp: int, tp: int = 1) -> dict:
    return {"config": {"schedule": {"micro_batch": micro, "grad_accumulation": g}},
            "layout": {"world": dp * tp, "tp": tp, "dp": dp}}


@pytest.mark.parametrize("micro, g, dp, saved, expected", [
    (2, 1, 2, (2, 1, 4), 2),   # dp 4 → 2 with the same command: G doubles (global 8)
    (2, 2, 4, (2, 2, 2), 1),   # dp 2 → 4: G halves
    (2, 2, 2, (2, 1, 4), 2),   # G already adjusted by hand: kept
    (2, 3, 4, (2, 1, 4), 3),   # same dp, another G: kept, so the identity check refuses the global batch
    (2, 2, 2, (2, 1, 8), 2),   # another dp and another G than saved (global 8 ≠ 16): kept, refused later
    (4, 1, 2, (2, 1, 4), 1),   # another micro-batch: kept, refused later by name
])
def test_grad_accumulation_keeps_the_saved_global_batch(micro, g, dp, saved, expected):
    assert resume_grad_accumulation(_cfg(micro, g), _record(*saved), dp) == expected


def test_global_batch_that_dp_cannot_divide_is_refused_naming_it():
    with pytest.raises(TrainError, match=r"global batch 6 .* cannot be kept at dp=4"):
        resume_grad_accumulation(_cfg(2, 3), _record(2, 3, 1), 4)


def test_old_identity_compares_by_global_batch_not_layout():
    old = {"model": {"h": 1}, "layout": {"tp": 1, "dp": 4}, "batch": {"micro_batch": 2, "grad_accumulation": 1}}
    assert identity_differences(old, {"model": {"h": 1}, "batch": {"micro_batch": 2, "global_batch": 8}}) == []
    differ = identity_differences(old, {"model": {"h": 1}, "batch": {"micro_batch": 2, "global_batch": 16}})
    assert differ == ["batch: saved {'micro_batch': 2, 'global_batch': 8}, now {'micro_batch': 2, "
                      "'global_batch': 16}"]

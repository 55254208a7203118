"""Teacher targets for the distillation loss, and the checks that turn bad input into clear errors.

Three kinds, matching how a teacher reaches the student:
- DenseTargets: an online teacher's logits, sharded over the vocabulary like the student's.
- SparseTargets: an offline cache's top-K per position: global ids, the teacher's true full-vocab
  log-probs there, and the log of the remaining mass (stored exactly at cache time, never 1 − Σp).
- SampledTargets: an offline cache's N draws with replacement: unique ids and their counts.

Validation reads every sparse target once (min/max/duplicates, O(N·K)); on CUDA that costs a host
sync per call, the price of never training silently against a malformed cache. Dense logits are not
scanned (that would cost a pass over the vocabulary): NaN in either side's logits makes the loss NaN,
which the trainer counts as a non-finite step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.losses.divergences import LossInputError

MASS_TOLERANCE = 1e-2
"""How far log(Σp_K + rest) of tail-mode targets may stray from 0 (quantised caches, bf16 values)."""


@dataclass(frozen=True)
class DenseTargets:
    """The teacher's logits for this rank's vocabulary shard, shape [..., Vl] like the student's."""

    logits: Tensor


@dataclass(frozen=True)
class SparseTargets:
    """Top-K teacher targets: ids [..., K] (global, −1 = padding), logprobs [..., K], log_rest [...].

    mode "tail" compares the K+1-outcome coarsenings (teacher and student each with a rest bucket):
    an exact f-divergence between coarsened distributions, a lower bound of the full one.
    mode "renorm" renormalises both sides over the K ids: the common, biased practice.
    """

    ids: Tensor
    logprobs: Tensor
    log_rest: Tensor
    mode: str = "tail"
    temperature: float = 1.0


@dataclass(frozen=True)
class SampledTargets:
    """Ids [..., K] drawn with replacement from the teacher (−1 = padding) and their counts [..., K]."""

    ids: Tensor
    counts: Tensor
    temperature: float = 1.0


def _fail(message: str) -> None:
    raise LossInputError(message)


def check_student(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        _fail(f"student_logits: expected a floating-point tensor [..., Vl], got {_describe(logits)}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        _fail(f"student_logits: expected shape [..., Vl] with Vl > 0, got {tuple(logits.shape)}")


def check_position_tensor(name: str, value: Tensor, lead: tuple, *, integer: bool) -> None:
    """A per-position tensor (labels, loss_mask, log_rest) must have the student's leading shape."""
    if not isinstance(value, Tensor):
        _fail(f"{name}: expected a tensor of shape {lead}, got {_describe(value)}")
    if tuple(value.shape) != lead:
        _fail(f"{name}: expected shape {lead} (the student logits' leading dims), got {tuple(value.shape)}")
    if integer and (value.is_floating_point() or value.is_complex()):
        _fail(f"{name}: expected an integer tensor, got dtype {value.dtype}")


def check_dense(targets: DenseTargets, student: Tensor) -> None:
    logits = targets.logits
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        _fail(f"DenseTargets.logits: expected a floating-point tensor, got {_describe(logits)}")
    if logits.shape != student.shape:
        _fail(f"DenseTargets.logits: expected the student's shape {tuple(student.shape)}, got {tuple(logits.shape)}")
    if logits.requires_grad:
        _fail("DenseTargets.logits: the teacher is a constant of the loss and receives no gradient; pass logits.detach()")


def check_sparse_shapes(name: str, ids: Tensor, values: Tensor, lead: tuple, values_name: str) -> None:
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
        _fail(f"{name}.ids: expected an int32 or int64 tensor, got {_describe(ids)}")
    if ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead:
        _fail(f"{name}.ids: expected shape {lead + ('K',)}, got {tuple(ids.shape)}")
    if not isinstance(values, Tensor) or tuple(values.shape) != tuple(ids.shape):
        _fail(f"{name}.{values_name}: expected the shape of ids {tuple(ids.shape)}, got {_describe(values)}")


def check_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    """Ids are −1 (padding) or in [0, vocab_size), and unique within each position."""
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < -1 or high >= vocab_size:
        bad = low if low < -1 else high
        _fail(f"{name}.ids: id {bad} is out of range; expected −1 (padding) or 0 ≤ id < vocab_size={vocab_size}")
    ordered = ids.reshape(-1, ids.shape[-1]).sort(dim=-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeated.any():
        row = int(repeated.any(dim=-1).nonzero()[0])
        _fail(f"{name}.ids: position {row} (flattened) repeats an id; each position's ids must be unique")


def check_temperature(name: str, made_at: float, asked: float) -> None:
    if not made_at > 0:
        _fail(f"{name}.temperature: expected > 0, got {made_at}")
    if made_at != asked:
        _fail(f"temperature={asked} differs from the temperature the {name} were made at ({made_at}); "
              "pass temperature equal to the targets' temperature")


def check_sparse(targets: SparseTargets, lead: tuple, vocab_size: int, temperature: float) -> None:
    check_sparse_shapes("SparseTargets", targets.ids, targets.logprobs, lead, "logprobs")
    if not targets.logprobs.is_floating_point():
        _fail(f"SparseTargets.logprobs: expected a floating-point tensor, got dtype {targets.logprobs.dtype}")
    check_position_tensor("SparseTargets.log_rest", targets.log_rest, lead, integer=False)
    if not targets.log_rest.is_floating_point():
        _fail(f"SparseTargets.log_rest: expected a floating-point tensor, got dtype {targets.log_rest.dtype}")
    if targets.mode not in ("tail", "renorm"):
        _fail(f"SparseTargets.mode: expected 'tail' or 'renorm', got {targets.mode!r}")
    check_temperature("SparseTargets", targets.temperature, temperature)
    check_ids("SparseTargets", targets.ids, vocab_size)
    present = targets.ids >= 0
    for label, values in (("logprobs", targets.logprobs[present]), ("log_rest", targets.log_rest)):
        if torch.isnan(values).any() or (values > MASS_TOLERANCE).any():
            _fail(f"SparseTargets.{label}: expected log-probabilities (≤ 0, no NaN), got max {values.max().item():.4g}")


def check_tail_mass(targets: SparseTargets, valid: Tensor) -> None:
    """In tail mode, each valid position's K log-probs and rest must make up the whole mass."""
    logp = torch.where(targets.ids >= 0, targets.logprobs.double(), float("-inf"))
    total = torch.logsumexp(torch.cat([logp, targets.log_rest.double().unsqueeze(-1)], dim=-1), dim=-1)
    off = (total.abs() > MASS_TOLERANCE) & valid.reshape(total.shape)
    if off.any():
        row = int(off.reshape(-1).nonzero()[0])
        _fail(f"SparseTargets: position {row} (flattened) has total mass exp({total.reshape(-1)[row].item():.4g}); "
              "logprobs must be the teacher's full-vocab log-probs and log_rest the log of the remaining mass")


def check_sampled(targets: SampledTargets, lead: tuple, vocab_size: int, temperature: float) -> None:
    check_sparse_shapes("SampledTargets", targets.ids, targets.counts, lead, "counts")
    check_temperature("SampledTargets", targets.temperature, temperature)
    check_ids("SampledTargets", targets.ids, vocab_size)
    counts = targets.counts
    if counts.numel() and ((counts < 0).any() or torch.isnan(counts.double()).any()):
        _fail("SampledTargets.counts: expected non-negative counts")
    if counts.numel() and (counts[targets.ids < 0] != 0).any():
        _fail("SampledTargets.counts: padded entries (id −1) must have count 0")


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__

"""`distill_loss`: f-divergence distillation over vocab-parallel logits, memory bounded by a chunk.

Design choice: the gradient is computed in the forward pass, chunk by chunk, into one buffer the
size of the logits; backward only scales it by the incoming gradient (in place). Peak memory above
the logits is that buffer (which the gradient would occupy anyway) plus one chunk's temporaries,
whatever the number of tokens; the alternative, recomputing in backward, keeps the same peak but
pays every exp twice. The costs: the buffer is held from forward to backward, and a second backward
through the same graph works only when the incoming gradient is 1 (any other scale is applied in
place, which autograd's version check reports). Double backward is not supported.

Communication per chunk is O(C) and O(C·K) numbers (see dense.py and sparse.py); no code path
gathers the vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pipeline.losses import targets as tg
from pipeline.losses.dense import dense_chunk
from pipeline.losses.divergences import LossInputError, resolve_divergence
from pipeline.losses.shard import Settings, Shard
from pipeline.losses.sparse import sparse_chunk

IGNORE_INDEX = -100
CHUNK_BYTES = 32 * 2**20
"""Largest chunk-sized compute-dtype temporary; sparse chunks hold about 2, dense 3 to 10 (forward KL 3)."""
CHUNKS_PER_BATCH = 32
MIN_CHUNK_ROWS = 64


@dataclass(frozen=True)
class DistillOutput:
    """The loss (differentiable) and its detached parts, averaged over the positions that count."""

    loss: Tensor
    kd: Tensor
    ce: Tensor
    metrics: dict = field(default_factory=dict)
    num_tokens: int = 0


@dataclass
class _Plan:
    """Everything one call needs, flattened to rows, so the autograd function stays small."""

    settings: Settings
    shard: Shard
    chunk: int
    weights: Tensor  # [N, 2] per-row gradient scales for the KD and CE parts
    labels: Tensor | None
    dense: Tensor | None = None
    sparse: tuple | None = None  # (ids, logprobs, log_rest, mode)
    sums: Tensor | None = None

    def run(self, x: Tensor, grad: Tensor | None) -> Tensor:
        total = torch.zeros(3, dtype=self.settings.dtype, device=x.device)
        for lo in range(0, x.shape[0], self.chunk):
            rows = slice(lo, lo + self.chunk)
            total += self.chunk_sums(x[rows], None if grad is None else grad[rows], rows)
        self.settings.scratch.clear()
        return total

    def chunk_sums(self, x: Tensor, grad: Tensor | None, rows: slice) -> Tensor:
        """[3] loss sums of the rows `rows` whose logits are x [C, Vl]; their gradient into `grad` if given."""
        labels = None if self.labels is None else self.labels[rows]
        if self.dense is not None:
            return dense_chunk(x, grad, self.dense[rows], labels, self.weights[rows], self.shard, self.settings)
        ids, logp, log_rest, mode = self.sparse
        return sparse_chunk(x, grad, ids[rows], logp[rows], log_rest[rows], mode, labels, self.weights[rows],
                            self.shard, self.settings)


class _DistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, plan: _Plan, scale: float) -> Tensor:
        x = logits.reshape(-1, logits.shape[-1])
        grad = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        plan.sums = plan.run(x, grad)
        cfg = plan.settings
        loss = (cfg.kd_weight * cfg.temperature**2 * plan.sums[0] + cfg.ce_weight * plan.sums[1]) * scale
        ctx.save_for_backward(None if grad is None else grad.view(logits.shape))
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        if not bool(grad_output == 1):
            grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None


def distill_loss(student_logits: Tensor, targets, *, divergence: str, tp_group=None, temperature: float = 1.0,
                 labels: Tensor | None = None, loss_mask: Tensor | None = None, ce_weight: float = 0.0,
                 chunk_size: int | None = None, vocab_size: int | None = None, **divergence_params) -> DistillOutput:
    """(1−ce_weight)·T²·D(teacher‖student) + ce_weight·CE, averaged over the positions that count.

    student_logits: this TP rank's contiguous vocabulary shard [..., Vl], any float dtype.
    targets: DenseTargets, SparseTargets or SampledTargets (or None with divergence="ce", where they
    are used, if given, only for the top-1 agreement metric).
    divergence: kl, rkl, js (beta), tvd, skew_kl (alpha), skew_rkl (alpha) or ce.
    Positions with loss_mask 0 or label −100 count nowhere. The result is the same on every TP rank.
    """
    tg.check_student(student_logits)
    plan, count, scale = build_plan(student_logits, student_logits.device, targets, divergence=divergence,
                                    tp_group=tp_group, temperature=temperature, labels=labels, loss_mask=loss_mask,
                                    ce_weight=ce_weight, chunk_size=chunk_size, vocab_size=vocab_size,
                                    divergence_params=divergence_params)
    loss = _DistillLoss.apply(student_logits, plan, scale)
    return output(loss, plan, count, scale)


def build_plan(student: Tensor, device, targets, *, divergence, tp_group, temperature, labels, loss_mask, ce_weight,
               chunk_size, vocab_size, divergence_params) -> tuple[_Plan, int, float]:
    """Validate one call and flatten it to a plan: (plan, positions that count, 1/count).

    `student` supplies only the logits' shape and dtype (a meta tensor will do); `device` is where they live.
    """
    div, params = resolve_divergence(divergence, divergence_params)
    _check_scalars(temperature, ce_weight, chunk_size)
    lead, local = tuple(student.shape[:-1]), student.shape[-1]
    shard = Shard.of(local, vocab_size, tp_group)
    ce_weight = 1.0 if div.name == "ce" else float(ce_weight)
    valid = _valid_positions(lead, labels, loss_mask, device, shard.vocab_size, needs_labels=ce_weight > 0)
    dense, sparse = _prepare_targets(targets, div, student, shard.vocab_size, temperature, valid)
    shard.check_agreement([math.prod(lead), local, 0 if sparse is None else sparse[0].shape[-1], shard.vocab_size])
    dtype = torch.promote_types(student.dtype, torch.float32)
    kd_weight = 0.0 if div.name == "ce" else 1.0 - ce_weight
    settings = Settings(div, params, float(temperature), kd_weight, ce_weight, dtype)
    count = int(valid.sum())
    scale = 1.0 / max(count, 1)
    per_row = torch.tensor([kd_weight * temperature * scale, ce_weight * scale], dtype=dtype, device=valid.device)
    plan = _Plan(settings, shard, chunk_size or _auto_chunk(math.prod(lead), local, dtype),
                 valid.reshape(-1, 1).to(dtype) * per_row,
                 None if labels is None else labels.reshape(-1), dense=dense, sparse=sparse)
    return plan, count, scale


def _check_scalars(temperature, ce_weight, chunk_size) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise LossInputError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if not (isinstance(ce_weight, (int, float)) and 0.0 <= ce_weight <= 1.0):
        raise LossInputError(f"ce_weight: expected a number in [0, 1], got {ce_weight!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise LossInputError(f"chunk_size: expected None (automatic) or an int ≥ 1, got {chunk_size!r}")


def _valid_positions(lead, labels, loss_mask, device, vocab, *, needs_labels: bool) -> Tensor:
    """Bool [N]: the positions that count (mask not 0 and label not −100)."""
    valid = torch.ones(lead, dtype=torch.bool, device=device)
    if loss_mask is not None:
        tg.check_position_tensor("loss_mask", loss_mask, lead, integer=False)
        valid &= loss_mask.to(device) != 0
    if labels is None:
        if needs_labels:
            raise LossInputError("labels: required when ce_weight > 0 or divergence='ce'")
    else:
        tg.check_position_tensor("labels", labels, lead, integer=True)
        ignored = labels == IGNORE_INDEX
        bad = ~ignored & ((labels < 0) | (labels >= vocab))
        if bad.any():
            raise LossInputError(f"labels: value {int(labels[bad][0])} is out of range; expected "
                                 f"{IGNORE_INDEX} (ignored) or 0 ≤ label < vocab_size={vocab}")
        valid &= ~ignored.to(device)
    return valid.reshape(-1)


def _prepare_targets(targets, div, student: Tensor, vocab: int, temperature: float, valid: Tensor):
    """(dense teacher [N, Vl] or None, (ids, logprobs, log_rest, mode) as rows or None)."""
    rows = valid.shape[0]
    if targets is None:
        if div.name != "ce":
            raise LossInputError(f"targets: required for divergence {div.name!r}; only 'ce' works without a teacher")
        ids = torch.empty(rows, 0, dtype=torch.long, device=valid.device)
        return None, (ids, ids.float(), torch.zeros(rows, device=valid.device), "tail")
    if isinstance(targets, tg.DenseTargets):
        tg.check_dense(targets, student)
        return targets.logits.reshape(rows, -1), None
    lead = tuple(student.shape[:-1])
    if isinstance(targets, tg.SparseTargets):
        return None, _sparse_rows(targets, lead, vocab, temperature, valid)
    if isinstance(targets, tg.SampledTargets):
        if not div.accepts_sampled:
            raise LossInputError(
                f"divergence {div.name!r} with SampledTargets: counts/N is an unbiased estimate of p only inside "
                f"losses linear in p (forward KL); {div.name!r} is not, so its estimate would be biased, or "
                "undefined where nothing was drawn. Use SparseTargets (top-K with rest mass) for it.")
        tg.check_sampled(targets, lead, vocab, temperature)
        return None, _sampled_rows(targets, valid)
    raise LossInputError(f"targets: expected DenseTargets, SparseTargets, SampledTargets or None, "
                         f"got {type(targets).__name__}")


def _sparse_rows(targets: tg.SparseTargets, lead, vocab, temperature, valid):
    tg.check_sparse(targets, lead, vocab, temperature)
    k = targets.ids.shape[-1]
    ids = targets.ids.reshape(-1, k)
    if targets.mode == "tail":
        tg.check_tail_mass(targets, valid)
    elif ((ids < 0).all(dim=-1) & valid).any():
        raise LossInputError("SparseTargets: mode 'renorm' needs at least one id at every position that counts")
    return ids, targets.logprobs.reshape(-1, k), targets.log_rest.reshape(-1), targets.mode


def _sampled_rows(targets: tg.SampledTargets, valid):
    """Sampled draws as tail-mode targets: p̂ = counts/Σcounts at the drawn ids, no rest mass."""
    k = targets.ids.shape[-1]
    ids, counts = targets.ids.reshape(-1, k), targets.counts.reshape(-1, k).double()
    total = counts.sum(dim=-1, keepdim=True)
    empty = (total.squeeze(-1) == 0) & valid
    if empty.any():
        raise LossInputError(f"SampledTargets: position {int(empty.nonzero()[0])} (flattened) counts but has no draws")
    logp = torch.where(counts > 0, counts.log() - total.clamp_min(1).log(), float("-inf"))
    log_rest = torch.full((ids.shape[0],), float("-inf"), dtype=torch.float64, device=ids.device)
    return ids, logp, log_rest, "tail"


def _auto_chunk(rows: int, local: int, dtype: torch.dtype) -> int:
    """Rows per chunk: one [chunk, Vl] temporary is at most CHUNK_BYTES, and at most 1/CHUNKS_PER_BATCH
    of the batch unless that is under MIN_CHUNK_ROWS rows, so that temporaries stay small next to the
    logits (bf16 logits with fp32 temporaries included) and the per-chunk overhead (kernel launches, two
    or three collectives) stays small. Dense chunks hold several such temporaries; a quarter of the rows
    for them, tried before, made the per-chunk collectives cost 2.3-2.6x megatron-core's CE at tp 2
    (benchmarks/README.md) where full chunks cost 1.97x."""
    row_bytes = local * torch.finfo(dtype).bits // 8
    by_bytes = max(1, CHUNK_BYTES // row_bytes)
    by_share = max(MIN_CHUNK_ROWS, math.ceil(rows / CHUNKS_PER_BATCH))
    return min(by_bytes, by_share)


def output(loss: Tensor, plan: _Plan, count: int, scale: float) -> DistillOutput:
    """The DistillOutput of a finished plan (its sums filled in) and the differentiable loss."""
    sums = plan.sums.detach()
    kd = plan.settings.temperature**2 * sums[0] * scale
    ce = sums[1] * scale
    metrics = {"top1_agreement": sums[2] * scale, "divergence": sums[0] * scale,
               "valid_tokens": torch.tensor(float(count))}
    return DistillOutput(loss=loss, kd=kd, ce=ce, metrics=metrics, num_tokens=count)

"""One chunk of rows against sparse teacher targets (top-K with rest mass, renormalised, sampled).

Per chunk: one MAX all-reduce of [C] and one SUM all-reduce of [C, K+3] numbers (the student's
logits at the K ids, its non-K exp-sum, the label logit, the temperature-1 exp-sum). Everything
after that is replicated [C, K+1] arithmetic, so no vocabulary-sized tensor ever crosses ranks.

The gradient is written during the forward pass into the caller's gradient buffer (the buffer
itself serves as the exp scratch when the logits are fp32), so the only vocabulary-sized
temporaries are this chunk's. The trade: the gradient buffer lives from forward to backward, which
is the same lifetime the gradient would have anyway. At temperature 1 the logits are read only before
the first write to that buffer, so it may be the logits themselves (distill_linear_loss's blocks are,
halving them).

The student's rest mass is a sum over its non-K entries (K entries zeroed before summing), never
1 − Σq, which cancels catastrophically when the K ids hold nearly all of the mass.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.losses.divergences import outcome_terms
from pipeline.losses.shard import Settings, Shard, all_reduce, gather_owned, label_logits, row_max

NEG_INF = float("-inf")


def sparse_chunk(x, grad, ids, logp, log_rest, mode, labels, weights, shard: Shard, cfg: Settings) -> Tensor:
    """Loss sums for rows x [C, Vl] and, when `grad` is given, their gradient written into it.

    `weights` is [C, 2]: each row's KD and CE gradient scale (0 for rows that do not count).
    Returns [3]: Σ divergence, Σ cross-entropy, Σ top-1 agreement over rows with weight.
    """
    temp = cfg.temperature
    xf = x[:, : shard.width].to(cfg.dtype)
    z = xf / temp if temp != 1.0 else xf
    top = all_reduce(row_max(z), "max", shard.group)
    z_at, (rows, slots, cols) = gather_owned(z, ids, shard)
    label_rc, extra = None, []
    if labels is not None:  # read before the exponentials, which may overwrite x (the fused path at T = 1)
        x_label, label_rc = label_logits(xf, labels, shard)
        sum_x = _exp_sum(xf, top * temp) if temp != 1.0 else torch.zeros_like(top)
        extra = [x_label.unsqueeze(-1), sum_x.unsqueeze(-1)]
    exp_rest, in_grad = _exp_scratch(z, top, grad, shard, cfg.dtype)
    exp_rest[rows, cols] = 0.0
    packed = [z_at, exp_rest.sum(dim=-1, keepdim=True), *extra]
    packed = all_reduce(torch.cat(packed, dim=-1), "sum", shard.group)
    k = ids.shape[-1]
    z_at, sum_rest = packed[:, :k], packed[:, k]
    out = _coarse(z_at, top, sum_rest, ids, logp, log_rest, mode, cfg)
    ce = _cross_entropy(out["log_s"], top, packed, k, temp) if labels is not None else torch.zeros_like(top)
    counted = weights[:, 0].ne(0) | weights[:, 1].ne(0)
    if grad is not None:
        _write_grad(grad, exp_rest, in_grad, xf, out, weights, (rows, slots, cols), label_rc, packed, top, shard, cfg)
    zero = torch.zeros_like(top)
    return torch.stack([torch.where(counted, out["div"], zero).sum(), torch.where(counted, ce, zero).sum(),
                        (counted & out["agree"]).sum().to(top.dtype)])


def _exp_scratch(z: Tensor, top: Tensor, grad, shard: Shard, dtype) -> tuple[Tensor, bool]:
    """exp(z − max) for the real columns, and whether it lives in the gradient buffer itself
    (it does when the buffer's dtype is the compute dtype, saving a temporary and a copy)."""
    if grad is not None and grad.dtype == dtype:
        scratch = grad[:, : shard.width]
        torch.sub(z, top.unsqueeze(-1), out=scratch)
        return scratch.exp_(), True
    return (z - top.unsqueeze(-1)).exp_(), False


def _exp_sum(values: Tensor, shift: Tensor) -> Tensor:
    return (values - shift.unsqueeze(-1)).exp_().sum(dim=-1)


def _coarse(z_at, top, sum_rest, ids, logp, log_rest, mode, cfg: Settings) -> dict:
    """Replicated math on the K+1 outcomes: divergence, W, and the gradient coefficients."""
    present = ids >= 0
    log_e = torch.where(present, z_at - top.unsqueeze(-1), NEG_INF)  # log exp(z−max) at the K ids
    log_rest_e = sum_rest.log()
    log_s = torch.logsumexp(torch.cat([log_e, log_rest_e.unsqueeze(-1)], dim=-1), dim=-1)
    teacher = torch.where(present, logp.to(cfg.dtype), NEG_INF)
    out = {"log_s": log_s, "log_e": log_e, "agree": _agreement(teacher, z_at, top, present)}
    zeros = torch.zeros_like(top)
    if not cfg.has_divergence:
        out.update(div=zeros, val=torch.zeros_like(z_at), coef=zeros)
    elif mode == "tail":
        log_q = torch.cat([log_e - log_s.unsqueeze(-1), (log_rest_e - log_s).unsqueeze(-1)], dim=-1)
        log_p = torch.cat([teacher, log_rest.to(cfg.dtype).unsqueeze(-1)], dim=-1)
        terms, w = outcome_terms(cfg.divergence, cfg.params, log_p, log_q)
        sw = w.sum(dim=-1)
        tiny = torch.finfo(cfg.dtype).tiny
        out.update(div=terms.sum(dim=-1), val=w[:, :-1] - log_q[:, :-1].exp() * sw.unsqueeze(-1),
                   coef=w[:, -1] / sum_rest.clamp_min(tiny) - sw * (-log_s).exp())
    else:
        log_q = log_e - torch.logsumexp(log_e, dim=-1, keepdim=True)
        log_p = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
        terms, w = outcome_terms(cfg.divergence, cfg.params, log_p, log_q)
        sw = w.sum(dim=-1)
        out.update(div=terms.sum(dim=-1), val=w - log_q.exp() * sw.unsqueeze(-1), coef=zeros)
    return out


def _agreement(teacher: Tensor, z_at: Tensor, top: Tensor, present: Tensor) -> Tensor:
    """Whether the student's largest logit sits at the teacher's most likely id."""
    if teacher.shape[-1] == 0:
        return torch.zeros_like(top, dtype=torch.bool)
    best = teacher.argmax(dim=-1, keepdim=True)
    return present.any(dim=-1) & (z_at.gather(-1, best).squeeze(-1) == top)


def _cross_entropy(log_s, top, packed, k, temp) -> Tensor:
    x_label = packed[:, k + 1]
    if temp == 1.0:
        return log_s + top - x_label
    return packed[:, k + 2].log() + top * temp - x_label


def _write_grad(grad, exp_rest, in_grad, xf, out, weights, owned, label_rc, packed, top, shard, cfg) -> None:
    """grad = KD and CE gradients of this chunk's rows, scaled by `weights`, in grad's dtype."""
    rows, slots, cols = owned
    kd, ce = weights[:, 0], weights[:, 1]
    coef, val = kd * out["coef"], kd.unsqueeze(-1) * out["val"]
    temp, k = cfg.temperature, val.shape[-1]
    if label_rc is not None and temp == 1.0:
        full_q_at = (out["log_e"] - out["log_s"].unsqueeze(-1)).exp()
        coef = coef + ce * (-out["log_s"]).exp()
        val = val + ce.unsqueeze(-1) * full_q_at
    counted = (kd != 0) | (ce != 0)
    coef = torch.where(counted, coef, 0.0)
    exp_rest.mul_(coef.unsqueeze(-1))
    exp_rest[rows, cols] = torch.where(counted[rows], val[rows, slots], 0.0)
    if label_rc is not None:
        if temp != 1.0 and cfg.ce_weight > 0:
            log_sx = packed[:, k + 2].log() + top * temp
            exp_rest.add_((xf - log_sx.unsqueeze(-1)).exp_().mul_(ce.unsqueeze(-1)))
        lab_rows, lab_cols = label_rc
        exp_rest.index_put_((lab_rows, lab_cols), -ce[lab_rows], accumulate=True)
    if not in_grad:
        grad[:, : shard.width].copy_(exp_rest)
    grad[:, shard.width:] = 0.0

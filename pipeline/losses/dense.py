"""One chunk of rows against dense teacher logits (an online teacher sharded like the student).

Per chunk: one MAX all-reduce of [C, 2] (student and teacher maxima), one SUM all-reduce of [C, 4]
(both exp-sums, the label logit, the temperature-1 exp-sum) and one SUM all-reduce of [C, 3] (the
divergence, ΣW and the top-1 flag). The divergence is exact over the full vocabulary; the cost is
about ten chunk-sized fp32 temporaries, which the automatic chunk size accounts for.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.losses.divergences import outcome_terms
from pipeline.losses.shard import Settings, Shard, all_reduce, label_logits, row_max


def dense_chunk(x, grad, teacher, labels, weights, shard: Shard, cfg: Settings) -> Tensor:
    """Loss sums for rows x [C, Vl] against teacher logits [C, Vl]; gradient into `grad` if given.

    Same contract as `sparse_chunk`: returns [3] = Σ divergence, Σ cross-entropy, Σ top-1 agreement.
    """
    temp, width = cfg.temperature, shard.width
    xf = x[:, :width].to(cfg.dtype)
    z = xf / temp if temp != 1.0 else xf
    t = teacher[:, :width].to(cfg.dtype)
    t = t / temp if temp != 1.0 else t
    tops = all_reduce(torch.stack([row_max(z), row_max(t)], dim=-1), "max", shard.group)
    z_top, t_top = tops[:, 0], tops[:, 1]
    exp_z = (z - z_top.unsqueeze(-1)).exp_()
    sums = [exp_z.sum(dim=-1), (t - t_top.unsqueeze(-1)).exp_().sum(dim=-1)]
    label_rc = None
    if labels is not None:
        x_label, label_rc = label_logits(xf, labels, shard)
        sum_x = (xf - (z_top * temp).unsqueeze(-1)).exp_().sum(dim=-1) if temp != 1.0 else torch.zeros_like(z_top)
        sums += [x_label, sum_x]
    sums = all_reduce(torch.stack(sums, dim=-1), "sum", shard.group)
    log_sz = sums[:, 0].log()
    log_q = z - (z_top + log_sz).unsqueeze(-1)
    agree = _local_agreement(z, t, z_top, t_top)
    parts = [torch.zeros_like(z_top), torch.zeros_like(z_top), agree.to(cfg.dtype)]
    w = None
    if cfg.has_divergence:
        log_p = t - (t_top + sums[:, 1].log()).unsqueeze(-1)
        terms, w = outcome_terms(cfg.divergence, cfg.params, log_p, log_q)
        parts[:2] = [terms.sum(dim=-1), w.sum(dim=-1)]
    parts = all_reduce(torch.stack(parts, dim=-1), "sum", shard.group)
    log_sx = _log_partition_t1(labels, temp, log_sz, z_top, sums)
    ce = log_sx - sums[:, 2] if log_sx is not None else torch.zeros_like(z_top)
    counted = weights[:, 0].ne(0) | weights[:, 1].ne(0)
    if grad is not None:
        _write_grad(grad, exp_z, log_sz, w, parts[:, 1], xf, log_sx, label_rc, weights, counted, shard)
    zero = torch.zeros_like(z_top)
    return torch.stack([torch.where(counted, parts[:, 0], zero).sum(), torch.where(counted, ce, zero).sum(),
                        (counted & parts[:, 2].gt(0)).sum().to(cfg.dtype)])


def _local_agreement(z: Tensor, t: Tensor, z_top: Tensor, t_top: Tensor) -> Tensor:
    """Whether this rank holds the teacher's global argmax and the student's global max sits there.

    Summed over ranks it says whether student and teacher agree on the top token (ties aside).
    """
    if t.shape[-1] == 0:
        return torch.zeros_like(z_top, dtype=torch.bool)
    local_best = t.argmax(dim=-1, keepdim=True)
    holds_teacher_top = t.gather(-1, local_best).squeeze(-1) == t_top
    return holds_teacher_top & (z.gather(-1, local_best).squeeze(-1) == z_top)


def _log_partition_t1(labels, temp, log_sz, z_top, sums):
    """log of the temperature-1 partition function, or None when there is no CE part."""
    if labels is None:
        return None
    return log_sz + z_top if temp == 1.0 else sums[:, 3].log() + z_top * temp


def _write_grad(grad, exp_z, log_sz, w, sum_w, xf, log_sx, label_rc, weights, counted, shard) -> None:
    """grad = kd·(W − q·ΣW) + ce·(softmax(x) − onehot(label)), rows that do not count zeroed.

    Written straight into the gradient buffer when its dtype is the compute dtype (no copy pass).
    """
    kd, ce = weights[:, 0:1], weights[:, 1:2]
    direct = grad.dtype == exp_z.dtype
    g = grad[:, : shard.width] if direct else torch.empty_like(exp_z)
    if w is not None:
        q_scale = (-log_sz).exp().unsqueeze(-1) * sum_w.unsqueeze(-1)
        torch.addcmul(w, exp_z, -q_scale, out=g).mul_(kd)
    else:
        g.zero_()
    if log_sx is not None and ce.any():
        g.add_((xf - log_sx.unsqueeze(-1)).exp_().mul_(ce))
        rows, cols = label_rc
        g.index_put_((rows, cols), -ce[rows, 0], accumulate=True)
    if not counted.all():
        g.masked_fill_(~counted.unsqueeze(-1), 0.0)
    if not direct:
        grad[:, : shard.width].copy_(g)
    grad[:, shard.width:] = 0.0

"""One chunk of rows against dense teacher logits (an online teacher sharded like the student).

Per chunk: one MAX all-reduce of [C, 2] (student and teacher maxima), one SUM all-reduce of [C, 4]
(both exp-sums, the label logit, the temperature-1 exp-sum) and one SUM all-reduce of [C, 3] (the
divergence, ΣW and the top-1 flag). The divergence is exact over the full vocabulary.

Cost, in passes over the chunk: each side's exponentials are computed once and shared by the
normaliser, the divergence and the gradient (the student's live in the gradient buffer and become
the gradient in place: g = e_z·a + kd·W, with the temperature-1 softmax of the CE part folded into
the scalar a when T = 1). Forward KL, the common case, has its own path: Σ p·log(p/q) is the
teacher's exponentials times t − z − c, summed per row (pairwise: a BLAS dot loses 1e-6 relative),
and W = −p is those exponentials scaled, so it takes about a dozen passes where the per-outcome
formulas take twice that (rows whose teacher has −inf logits, 0·inf there, are summed again with
those terms set to 0). The other divergences go through the per-outcome formulas of divergences.py.
Chunk-sized temporaries live in the call's Scratch, reused by every chunk, since allocating them
afresh per chunk costs more than their arithmetic on CPU.

The per-outcome formulas hold about ten temporaries (log p, log q's inputs, mixtures, p, q, W, ...), so a
chunk runs them in row blocks of about 2^18 numbers on CPU (2^22 on an accelerator), collectives staying
per chunk: only W is kept chunk-sized, written over z − max once a block has read it as log q. In the fused
loss at N = 8192, V = 32000 this took js on dense targets from 0.16 to 0.10 of the logits' size in working
memory at tp 1 (0.17 to 0.12 at tp 2; benchmarks/README.md). The cost is a copy of W per block and ~25 ops
per block instead of per chunk: on 2 CPU cores the same time as whole-chunk formulas (benchmarks/loss.py
--formula-elements); blocks of a single row took 1.3-1.4x, hence a count of numbers rather than of rows.
The accelerator figure is a launch-overhead guess, not a measurement.

Everything that reads the student's logits (its maximum, the label logit, the top-1 check, t − z for
KL, z − max for the other divergences) runs before its exponentials are written, so at temperature 1
the gradient buffer may be the logits themselves: distill_linear_loss's blocks are, which halves them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.losses.divergences import outcome_terms
from pipeline.losses.shard import Settings, Shard, all_reduce, label_logits, row_max

CPU_FORMULA_ELEMENTS = 1 << 18
"""Numbers per row block of the per-outcome formulas' temporaries on CPU (see the module docstring)."""
DEVICE_FORMULA_ELEMENTS = 1 << 22
"""The same on an accelerator, where a kernel launch, not its arithmetic, is the cost of a small block."""


def dense_chunk(x, grad, teacher, labels, weights, shard: Shard, cfg: Settings) -> Tensor:
    """Loss sums for rows x [C, Vl] against teacher logits [C, Vl]; gradient into `grad` if given.

    Same contract as `sparse_chunk`: returns [3] = Σ divergence, Σ cross-entropy, Σ top-1 agreement.
    """
    temp, width = cfg.temperature, shard.width
    xf = _compute_copy("x", x[:, :width], 1.0, cfg)
    z = _compute_copy("z", xf, temp, cfg) if temp != 1.0 else xf
    t = _compute_copy("t", teacher[:, :width], temp, cfg)
    t_local, t_best = _max_and_argmax(t)
    tops = all_reduce(torch.stack([row_max(z), t_local], dim=-1), "max", shard.group)
    z_top, t_top = tops[:, 0], tops[:, 1]
    # z and x are read before the student's exponentials are written: these go into the gradient buffer,
    # which may be x itself (distill_linear_loss's blocks at temperature 1)
    agree = (t_local == t_top) & (z.gather(-1, t_best.unsqueeze(-1)).squeeze(-1) == z_top) if width else t_local > 0
    label_rc, exp_x, extra = None, None, []
    if labels is not None:
        x_label, label_rc = label_logits(xf, labels, shard)
        if temp != 1.0:
            exp_x = torch.sub(xf, (z_top * temp).unsqueeze(-1), out=cfg.scratch.get("exp_x", xf, cfg.dtype)).exp_()
        extra = [x_label, exp_x.sum(dim=-1) if exp_x is not None else torch.zeros_like(z_top)]
    kl = cfg.divergence.name == "kl"
    diff = torch.sub(t, z, out=cfg.scratch.get("diff", t, cfg.dtype)) if kl else None  # t − z, for KL's rows
    shifted = None  # z − max, for the per-outcome formulas' log q
    if cfg.has_divergence and not kl:
        shifted = torch.sub(z, z_top.unsqueeze(-1), out=cfg.scratch.get("shifted", z, cfg.dtype))
    direct = grad is not None and grad.dtype == cfg.dtype
    exp_z = grad[:, :width] if direct else cfg.scratch.get("exp_z", z, cfg.dtype)
    if shifted is not None:
        torch.exp(shifted, out=exp_z)
    else:
        torch.sub(z, z_top.unsqueeze(-1), out=exp_z).exp_()
    exp_t = torch.sub(t, t_top.unsqueeze(-1), out=cfg.scratch.get("exp_t", t, cfg.dtype)).exp_() if kl else None
    local_st = exp_t.sum(dim=-1) if kl else _exp_sums(t, t_top, cfg)
    sums = all_reduce(torch.stack([exp_z.sum(dim=-1), local_st, *extra], dim=-1), "sum", shard.group)
    parts = [torch.zeros_like(z_top), torch.zeros_like(z_top), agree.to(cfg.dtype)]
    w = None
    if kl:
        parts[:2] = [_kl_rows(diff, exp_t, tops, sums), -local_st / sums[:, 1]]
    elif cfg.has_divergence:
        parts[:2], w = list(_outcome_rows(shifted, t, t_top, sums, cfg)), shifted
    parts = all_reduce(torch.stack(parts, dim=-1), "sum", shard.group)
    log_sx = _log_partition_t1(labels, temp, sums[:, 0].log(), z_top, sums)
    ce = log_sx - sums[:, 2] if log_sx is not None else torch.zeros_like(z_top)
    counted = weights[:, 0].ne(0) | weights[:, 1].ne(0)
    if grad is not None:
        w_scale = weights[:, 0:1]
        if cfg.divergence.name == "kl":  # W = −p = −exp_t/S_t: the exponentials, scaled in the same pass
            w, w_scale = exp_t, w_scale * (-1.0 / sums[:, 1:2])
        _write_grad(grad, exp_z, direct, (w, w_scale), parts[:, 1], sums, exp_x, label_rc, weights, counted, shard,
                    temp)
    zero = torch.zeros_like(z_top)
    return torch.stack([torch.where(counted, parts[:, 0], zero).sum(), torch.where(counted, ce, zero).sum(),
                        (counted & parts[:, 2].gt(0)).sum().to(cfg.dtype)])


def _outcome_rows(shifted: Tensor, t: Tensor, t_top: Tensor, sums: Tensor, cfg: Settings) -> Tensor:
    """[2, C]: Σ term and ΣW per row from the per-outcome formulas, a row block at a time; W
    overwrites `shifted` (z − max), which each row block reads, as log q, before its W is written."""
    rows = shifted.shape[0]
    out = torch.empty(2, rows, dtype=cfg.dtype, device=shifted.device)
    log_sz, log_st = sums[:, 0].log().unsqueeze(-1), sums[:, 1].log().unsqueeze(-1)
    for block in _row_blocks(shifted):
        log_q = shifted[block].sub_(log_sz[block])
        log_p = torch.sub(t[block], t_top[block].unsqueeze(-1), out=cfg.scratch.get("log_p", log_q, cfg.dtype))
        log_p.sub_(log_st[block])  # as log q: equal rows stay equal
        terms, w = outcome_terms(cfg.divergence, cfg.params, log_p, log_q, _scratch_buffers(cfg, log_p))
        torch.sum(terms, dim=-1, out=out[0, block])
        torch.sum(w, dim=-1, out=out[1, block])
        log_q.copy_(w)
    return out


def _exp_sums(t: Tensor, t_top: Tensor, cfg: Settings) -> Tensor:
    """Σ exp(t − max) per row, a row block at a time (the exponentials are only summed)."""
    out = torch.empty(t.shape[0], dtype=cfg.dtype, device=t.device)
    for block in _row_blocks(t):
        exp_t = torch.sub(t[block], t_top[block].unsqueeze(-1), out=cfg.scratch.get("exp_t", t[block], cfg.dtype))
        torch.sum(exp_t.exp_(), dim=-1, out=out[block])
    return out


def _row_blocks(like: Tensor) -> list[slice]:
    """Row ranges of about CPU_/DEVICE_FORMULA_ELEMENTS numbers (at least one row each) covering `like`'s rows."""
    rows, cols = like.shape
    elements = CPU_FORMULA_ELEMENTS if like.device.type == "cpu" else DEVICE_FORMULA_ELEMENTS
    step = max(1, elements // max(1, cols))
    return [slice(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def _scratch_buffers(cfg: Settings, like: Tensor):
    """The per-outcome formulas' buffers, from the call's Scratch: no fresh [C, Vl] tensor per chunk (on CPU,
    glibc's heap grew by up to 0.4x the logits over a call from them, fragmented between chunks)."""
    def buf(name: str, dtype: torch.dtype | None = None) -> Tensor:
        return cfg.scratch.get("formula_" + name, like, dtype or cfg.dtype)
    return buf


def _compute_copy(name: str, values: Tensor, temp: float, cfg: Settings) -> Tensor:
    """values/temp in the compute dtype: `values` itself when nothing changes, else a scratch buffer."""
    if values.dtype == cfg.dtype and temp == 1.0:
        return values
    out = cfg.scratch.get(name, values, cfg.dtype)
    out.copy_(values)
    return out.div_(temp) if temp != 1.0 else out


def _max_and_argmax(t: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's row maxima (−inf for an empty shard) and where they sit, in one pass."""
    if t.shape[-1] == 0:
        return row_max(t), torch.zeros(t.shape[0], dtype=torch.long, device=t.device)
    best = t.max(dim=-1)
    return best.values, best.indices


def _kl_rows(diff, exp_t, tops, sums) -> Tensor:
    """This rank's Σ p·(log p − log q) per row, as (exp_t · (t − z − c)) / S_t, with c the normalisers'
    difference and diff = t − z (overwritten)."""
    c = (tops[:, 1] + sums[:, 1].log()) - (tops[:, 0] + sums[:, 0].log())
    terms = diff.sub_(c.unsqueeze(-1)).mul_(exp_t)
    rows = terms.sum(dim=-1) / sums[:, 1]  # pairwise; a dot loses ~1e-6
    redo = rows.isnan().nonzero().squeeze(-1)
    if redo.numel():  # 0·(−inf) where the teacher gives an id no mass: those terms are 0 (0·log 0)
        rows[redo] = torch.where(exp_t[redo] > 0, terms[redo], 0.0).sum(dim=-1) / sums[redo, 1]
    return rows


def _log_partition_t1(labels, temp, log_sz, z_top, sums):
    """log of the temperature-1 partition function, or None when there is no CE part."""
    if labels is None:
        return None
    return log_sz + z_top if temp == 1.0 else sums[:, 3].log() + z_top * temp


def _write_grad(grad, exp_z, direct, scaled_w, sum_w, sums, exp_x, label_rc, weights, counted, shard, temp) -> None:
    """grad = kd·(W − q·ΣW) + ce·(softmax(x) − onehot(label)), rows that do not count zeroed.

    Built in place over the student's exponentials: q = e_z/S_z, so g = e_z·(ce·[T=1] − kd·ΣW)/S_z + kd·W,
    plus ce·e_x/S_x (the temperature-1 softmax) when T ≠ 1. `scaled_w` is (w, s) with s·w = kd·W.
    """
    kd, ce = weights[:, 0:1], weights[:, 1:2]
    w, w_scale = scaled_w
    coef = -kd * sum_w.unsqueeze(-1) if w is not None else torch.zeros_like(kd)
    if label_rc is not None and temp == 1.0:
        coef = coef + ce
    g = exp_z.mul_(coef / sums[:, 0:1])
    if w is not None:
        g.addcmul_(w, w_scale)
    if label_rc is not None:
        if exp_x is not None and ce.any():
            g.addcmul_(exp_x, ce / sums[:, 3:4])
        rows, cols = label_rc
        g.index_put_((rows, cols), -ce[rows, 0], accumulate=True)
    if not counted.all():
        g.masked_fill_(~counted.unsqueeze(-1), 0.0)
    if not direct:
        grad[:, : shard.width].copy_(g)
    grad[:, shard.width:] = 0.0

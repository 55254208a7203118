"""The f-divergences as per-outcome formulas, and which teacher target kinds each accepts.

Every divergence D(P‖Q) between teacher P and student Q is a sum over outcomes (vocabulary entries,
or the K+1 outcomes of a coarsened distribution). For each outcome a formula returns two numbers:
the term it adds to D, and W = Q·∂D/∂Q (constants that cancel in the softmax Jacobian dropped).
The gradient with respect to the student logits then needs only one more per-row scalar,
ΣW, whatever the divergence: ∂D/∂z_j = (q_j/Q_o(j))·W_o(j) − q_j·ΣW. Keeping W in this form
(rather than ∂D/∂Q) means no formula divides by a probability that may underflow.

Zero-probability outcomes never produce NaN: terms of the form a·log(a/b) are 0 where a is 0.
Where the true divergence is infinite (the student puts mass where the teacher puts none, in the
reverse directions), the teacher's log-probability is floored at LOGP_FLOOR, so the loss is large
and finite instead of inf. That floor is the only place these formulas depart from the definitions.

The formulas write every [rows, outcomes] temporary into named buffers that the caller may reuse (the
dense kernel hands them its chunk Scratch), never into a fresh tensor: on CPU, fresh vocabulary-sized
temporaries freed every chunk fragmented the heap until a call's resident set grew 0.4-0.5x the logits
(benchmarks/README.md). The cost is formulas in out=/in-place style, each op ordered as the plain
expression so results are bit-identical to it; tests/reference.py keeps the plain expressions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

LOGP_FLOOR = -100.0
"""Teacher (or mixture) log-probabilities below this are raised to it in reverse-direction terms."""


class LossInputError(ValueError):
    """Bad input to the distillation loss: the message names the argument and what was expected."""


Buffers = Callable[..., Tensor]
"""buf(name, dtype=None): a tensor shaped like log_p to write into (a chunk's reused scratch, or fresh)."""


def _plogratio(prob: Tensor, log_a: Tensor, log_b: Tensor, out: Tensor, buf: Buffers) -> Tensor:
    """prob·(log_a − log_b) into `out` (which may be log_a or log_b), 0 wherever prob is not > 0
    (0·log 0 = 0, never NaN)."""
    torch.sub(log_a, log_b, out=out).mul_(prob)
    return out.masked_fill_(torch.gt(prob, 0, out=buf("positive", torch.bool)).logical_not_(), 0.0)


def _exp(log_x: Tensor, name: str, buf: Buffers) -> Tensor:
    return torch.exp(log_x, out=buf(name))


def _log_mix(log_a: Tensor, log_b: Tensor, weight: float, buf: Buffers) -> Tensor:
    """log(weight·a + (1 − weight)·b) from log a and log b."""
    shifted_a = torch.add(log_a, math.log(weight), out=buf("mix_a"))
    shifted_b = torch.add(log_b, math.log1p(-weight), out=buf("mix_b"))
    return torch.logaddexp(shifted_a, shifted_b, out=buf("log_m"))


def _kl(log_p: Tensor, log_q: Tensor, params: dict, buf: Buffers) -> tuple[Tensor, Tensor]:
    p = _exp(log_p, "p", buf)
    return _plogratio(p, log_p, log_q, buf("term"), buf), p.neg_()


def _rkl(log_p: Tensor, log_q: Tensor, params: dict, buf: Buffers) -> tuple[Tensor, Tensor]:
    q = _exp(log_q, "q", buf)
    floored = torch.clamp_min(log_p, LOGP_FLOOR, out=buf("term"))
    term = _plogratio(q, log_q, floored, floored, buf)
    return term, term


def _js(log_p: Tensor, log_q: Tensor, params: dict, buf: Buffers) -> tuple[Tensor, Tensor]:
    beta = params["beta"]
    log_m = _log_mix(log_p, log_q, beta, buf)
    p, q = _exp(log_p, "p", buf), _exp(log_q, "q", buf)
    w = _plogratio(q, log_q, log_m, buf("w"), buf).mul_(1.0 - beta)  # (1 − β)·q·log(q/m)
    term = _plogratio(p, log_p, log_m, log_m, buf).mul_(beta)
    return term.add_(w), w


def _tvd(log_p: Tensor, log_q: Tensor, params: dict, buf: Buffers) -> tuple[Tensor, Tensor]:
    p, q = _exp(log_p, "p", buf), _exp(log_q, "q", buf)
    w = torch.sub(q, p, out=buf("w")).sign_().mul_(q).mul_(0.5)
    return torch.sub(p, q, out=p).abs_().mul_(0.5), w


def _q_over_m(prob: Tensor, log_q: Tensor, log_m: Tensor, buf: Buffers) -> Tensor:
    """q/m, as exp(log q − log m), where prob > 0 and 0 elsewhere."""
    ratio = torch.sub(log_q, log_m, out=buf("ratio")).exp_()
    return ratio.masked_fill_(torch.gt(prob, 0, out=buf("positive", torch.bool)).logical_not_(), 0.0)


def _skew_kl(log_p: Tensor, log_q: Tensor, params: dict, buf: Buffers) -> tuple[Tensor, Tensor]:
    alpha = params["alpha"]
    if alpha == 0.0:
        return _kl(log_p, log_q, params, buf)
    log_m = _log_mix(log_p, log_q, alpha, buf)
    p = _exp(log_p, "p", buf)
    w = _q_over_m(p, log_q, log_m, buf)
    w.mul_(torch.mul(p, -(1.0 - alpha), out=buf("w")))  # −(1 − α)·p·q/m
    return _plogratio(p, log_p, log_m, log_m, buf), w


def _skew_rkl(log_p: Tensor, log_q: Tensor, params: dict, buf: Buffers) -> tuple[Tensor, Tensor]:
    alpha = params["alpha"]
    if alpha == 0.0:
        return _rkl(log_p, log_q, params, buf)
    log_m = _log_mix(log_q, log_p, alpha, buf)
    q = _exp(log_q, "q", buf)
    ratio = _q_over_m(q, log_q, log_m, buf)
    term = _plogratio(q, log_q, log_m, log_m, buf)
    ratio.mul_(torch.mul(q, alpha, out=buf("w")))  # α·q·q/m
    return term, torch.sub(term, ratio, out=ratio)


Formula = Callable[[Tensor, Tensor, dict, Buffers], "tuple[Tensor, Tensor]"]


@dataclass(frozen=True)
class Param:
    """A divergence parameter: its default and the interval it must lie in."""

    default: float
    low: float
    high: float
    low_open: bool
    high_open: bool

    def describe(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


@dataclass(frozen=True)
class Divergence:
    """A named divergence: its per-outcome formula, parameters, and whether sampled targets fit it."""

    name: str
    formula: Formula | None
    params: dict
    accepts_sampled: bool
    summary: str


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in [
        Divergence("kl", _kl, {}, True, "KL(p‖q), forward KL"),
        Divergence("rkl", _rkl, {}, False, "KL(q‖p), reverse KL"),
        Divergence("js", _js, {"beta": Param(0.5, 0.0, 1.0, True, True)}, False,
                   "β·KL(p‖M) + (1−β)·KL(q‖M), M = βp + (1−β)q"),
        Divergence("tvd", _tvd, {}, False, "½·Σ|p − q|, total variation"),
        Divergence("skew_kl", _skew_kl, {"alpha": Param(0.1, 0.0, 1.0, False, True)}, False,
                   "KL(p ‖ αp + (1−α)q)"),
        Divergence("skew_rkl", _skew_rkl, {"alpha": Param(0.1, 0.0, 1.0, False, True)}, False,
                   "KL(q ‖ αq + (1−α)p)"),
        Divergence("ce", None, {}, True, "cross-entropy with the hard labels only; targets unused"),
    ]
}


def resolve_divergence(name: str, given: dict) -> tuple[Divergence, dict]:
    """The divergence called `name` and its full parameter dict; a clear error for anything else."""
    if name not in DIVERGENCES:
        raise LossInputError(f"divergence: unknown name {name!r}; expected one of {sorted(DIVERGENCES)}")
    div = DIVERGENCES[name]
    unknown = sorted(set(given) - set(div.params))
    if unknown:
        takes = sorted(div.params) or "no parameters"
        raise LossInputError(f"divergence {name!r}: unexpected parameter(s) {unknown}; it takes {takes}")
    params = {}
    for key, spec in div.params.items():
        value = float(given.get(key, spec.default))
        if not spec.contains(value):
            raise LossInputError(f"divergence {name!r}: {key}={value} is out of range; expected {key} in {spec.describe()}")
        params[key] = value
    return div, params


def outcome_terms(div: Divergence, params: dict, log_p: Tensor, log_q: Tensor,
                  buf: Buffers | None = None) -> tuple[Tensor, Tensor]:
    """Per-outcome (term, W) for teacher/student log-probabilities of the same shape.

    The formulas write into buffers from `buf` (see Buffers), never into log_p or log_q, and the results
    live in them until the next call with the same `buf`; without one each buffer is fresh.
    """
    if buf is None:
        def buf(name: str, dtype: torch.dtype | None = None) -> Tensor:
            return torch.empty_like(log_p, dtype=dtype)
    return div.formula(log_p, log_q, params, buf)

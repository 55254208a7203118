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


def _plogratio(prob: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """prob·(log_a − log_b), defined as 0 wherever prob is 0 (0·log 0 = 0, never NaN)."""
    return torch.where(prob > 0, (log_a - log_b).mul_(prob), 0.0)


def _kl(log_p: Tensor, log_q: Tensor, params: dict) -> tuple[Tensor, Tensor]:
    p = log_p.exp()
    return _plogratio(p, log_p, log_q), -p


def _rkl(log_p: Tensor, log_q: Tensor, params: dict) -> tuple[Tensor, Tensor]:
    q = log_q.exp()
    term = _plogratio(q, log_q, log_p.clamp_min(LOGP_FLOOR))
    return term, term


def _js(log_p: Tensor, log_q: Tensor, params: dict) -> tuple[Tensor, Tensor]:
    beta = params["beta"]
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    p, q = log_p.exp(), log_q.exp()
    q_part = _plogratio(q, log_q, log_m)
    return beta * _plogratio(p, log_p, log_m) + (1.0 - beta) * q_part, (1.0 - beta) * q_part


def _tvd(log_p: Tensor, log_q: Tensor, params: dict) -> tuple[Tensor, Tensor]:
    p, q = log_p.exp(), log_q.exp()
    return 0.5 * (p - q).abs(), 0.5 * q * torch.sign(q - p)


def _skew_kl(log_p: Tensor, log_q: Tensor, params: dict) -> tuple[Tensor, Tensor]:
    alpha = params["alpha"]
    if alpha == 0.0:
        return _kl(log_p, log_q, params)
    log_m = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
    p = log_p.exp()
    q_over_m = torch.where(p > 0, (log_q - log_m).exp(), torch.zeros_like(p))
    return _plogratio(p, log_p, log_m), -(1.0 - alpha) * p * q_over_m


def _skew_rkl(log_p: Tensor, log_q: Tensor, params: dict) -> tuple[Tensor, Tensor]:
    alpha = params["alpha"]
    if alpha == 0.0:
        return _rkl(log_p, log_q, params)
    log_m = torch.logaddexp(log_q + math.log(alpha), log_p + math.log1p(-alpha))
    q = log_q.exp()
    term = _plogratio(q, log_q, log_m)
    q_over_m = torch.where(q > 0, (log_q - log_m).exp(), torch.zeros_like(q))
    return term, term - alpha * q * q_over_m


Formula = Callable[[Tensor, Tensor, dict], "tuple[Tensor, Tensor]"]


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


def outcome_terms(div: Divergence, params: dict, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
    """Per-outcome (term, W) for teacher/student log-probabilities of the same shape."""
    return div.formula(log_p, log_q, params)

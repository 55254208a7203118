"""Independent float64 references for the distillation losses, and deterministic test cases.

The references are written from the definitions over the full, gathered vocabulary with plain
autograd, sharing no code with pipeline/losses, so that a shared mistake cannot hide. A case is a
pure function of its parameters, so the parent process and every rank of a distributed run rebuild
identical tensors from it and each rank slices out its own vocabulary shard. `run_case` and
`assert_matches_reference` are the one-rank run and the check shared by the tp = 1 and dist tiers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.losses import DenseTargets, SampledTargets, SparseTargets, distill_loss

FLOOR = -100.0  # the documented floor on teacher log-probs in reverse-direction terms


@dataclass(frozen=True)
class Case:
    divergence: str
    kind: str  # dense | tail | renorm | sampled | none
    temperature: float = 1.0
    ce_weight: float = 0.0
    masked: bool = False
    tokens: int = 12
    padded_vocab: int = 64
    vocab: int = 61
    k: int = 6
    seed: int = 0
    params: tuple = ()

    @property
    def name(self) -> str:
        extra = "".join(f"-{k}{v}" for k, v in self.params)
        return f"{self.divergence}-{self.kind}-T{self.temperature}-w{self.ce_weight}{'-masked' if self.masked else ''}{extra}"


def full_inputs(case: Case) -> dict:
    """Student and teacher logits over the padded vocab, labels, mask and sparse targets."""
    gen = torch.Generator().manual_seed(case.seed)
    n, vp, v = case.tokens, case.padded_vocab, case.vocab
    student = (torch.randn(n, vp, generator=gen) * 1.5).double()  # fp32 values, held in float64
    teacher = (torch.randn(n, vp, generator=gen) * 2.5).double()
    student[::2] = 0.5 * student[::2] + teacher[::2]  # even rows mostly share the teacher's top-1: agreement > 0
    labels = torch.randint(0, v, (n,), generator=gen)
    mask = torch.ones(n)
    if case.masked:
        labels[1] = -100
        mask[3] = 0
    log_p = (teacher[:, :v] / case.temperature).log_softmax(-1)
    top = log_p.topk(case.k, dim=-1)
    ids, logprobs = top.indices.clone(), top.values.float().double()
    ids[0, -1], logprobs[0, -1] = -1, 0.0  # a padded entry: its mass moves to the rest bucket
    keep = torch.zeros(n, v, dtype=torch.bool).scatter_(1, ids.clamp_min(0), True)
    keep[0, top.indices[0, -1]] = False
    log_rest = torch.where(keep, float("-inf"), log_p).logsumexp(-1).float().double()
    draws = torch.multinomial(log_p.exp(), 40, replacement=True, generator=gen)
    counts = torch.zeros(n, v).scatter_add_(1, draws, torch.ones(n, 40))
    sampled = counts.topk(int((counts > 0).sum(-1).max()), dim=-1)
    s_ids = torch.where(sampled.values > 0, sampled.indices, -1)
    return dict(student=student, teacher=teacher, labels=labels, mask=mask, ids=ids, logprobs=logprobs,
                log_rest=log_rest, s_ids=s_ids, s_counts=sampled.values.clamp_min(0), sampled_total=counts)


def shard_targets(case: Case, inputs: dict, lo: int, hi: int, dtype=torch.float32):
    """The targets object a rank owning padded-vocab columns [lo, hi) passes to distill_loss."""
    if case.kind == "dense":
        return DenseTargets(inputs["teacher"][:, lo:hi].to(dtype))
    if case.kind in ("tail", "renorm"):
        return SparseTargets(inputs["ids"], inputs["logprobs"].to(dtype), inputs["log_rest"].to(dtype),
                             mode=case.kind, temperature=case.temperature)
    if case.kind == "sampled":
        return SampledTargets(inputs["s_ids"], inputs["s_counts"].to(dtype), temperature=case.temperature)
    return None


def _plogratio(a, la, lb):
    """a·(la − lb), 0 where a is 0; the masking keeps autograd free of 0·inf as well."""
    live = a > 0
    return torch.where(live, a * (torch.where(live, la, 0.0) - torch.where(live, lb, 0.0)), 0.0)


def divergence_rows(name: str, log_p, log_q, params: dict):
    """D(P‖Q) per row, summed over the last dim, from the textbook definitions."""
    p, q = log_p.exp(), log_q.exp()

    def log(m):  # finite at m = 0, so autograd never multiplies 0 by inf there
        return m.clamp_min(1e-300).log()

    if name == "kl":
        return _plogratio(p, log_p, log_q).sum(-1)
    if name == "rkl":
        return _plogratio(q, log_q, log_p.clamp_min(FLOOR)).sum(-1)
    if name == "js":
        beta = params.get("beta", 0.5)
        m = beta * p + (1 - beta) * q
        return beta * _plogratio(p, log_p, log(m)).sum(-1) + (1 - beta) * _plogratio(q, log_q, log(m)).sum(-1)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    alpha = params.get("alpha", 0.1)
    if name == "skew_kl":
        return _plogratio(p, log_p, log(alpha * p + (1 - alpha) * q)).sum(-1)
    if name == "skew_rkl":
        return _plogratio(q, log_q, log(alpha * q + (1 - alpha) * p).clamp_min(FLOOR)).sum(-1)
    raise ValueError(name)


def _coarsen(log_probs, ids):
    """[N, K+1]: log-probs at the ids (−inf at padding) and the log of the mass elsewhere."""
    present = ids >= 0
    at = torch.where(present, log_probs.gather(1, ids.clamp_min(0)), float("-inf"))
    rows, slots = present.nonzero(as_tuple=True)
    elsewhere = torch.ones_like(log_probs, dtype=torch.bool)
    elsewhere[rows, ids[rows, slots]] = False
    rest = torch.where(elsewhere, log_probs, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([at, rest], dim=-1)


def reference_loss(case: Case, inputs: dict, student_full: torch.Tensor) -> dict:
    """Loss, KD and CE parts from a float64 student [N, padded_vocab] that may require grad."""
    v, temp = case.vocab, case.temperature
    log_q = (student_full[:, :v] / temp).log_softmax(-1)
    log_p = (inputs["teacher"][:, :v] / temp).log_softmax(-1)
    params = dict(case.params)
    if case.kind == "dense":
        rows = divergence_rows(case.divergence, log_p, log_q, params)
    elif case.kind == "tail":
        teacher = torch.cat([torch.where(inputs["ids"] >= 0, inputs["logprobs"], float("-inf")),
                             inputs["log_rest"].unsqueeze(-1)], dim=-1)
        rows = divergence_rows(case.divergence, teacher, _coarsen(log_q, inputs["ids"]), params)
    elif case.kind == "renorm":
        ids = inputs["ids"]
        student = torch.where(ids >= 0, log_q.gather(1, ids.clamp_min(0)), float("-inf"))
        teacher = torch.where(ids >= 0, inputs["logprobs"], float("-inf"))
        rows = divergence_rows(case.divergence, teacher - teacher.logsumexp(-1, keepdim=True),
                               student - student.logsumexp(-1, keepdim=True), params)
    elif case.kind == "sampled":
        p_hat = inputs["sampled_total"] / inputs["sampled_total"].sum(-1, keepdim=True)
        rows = divergence_rows("kl", p_hat.log(), log_q, {})
    else:
        rows = torch.zeros(student_full.shape[0], dtype=torch.float64)
    ce_rows = torch.nn.functional.cross_entropy(student_full[:, :v], inputs["labels"].clamp_min(0), reduction="none")
    valid = (inputs["labels"] != -100) & (inputs["mask"] != 0)
    w = 1.0 if case.divergence == "ce" else case.ce_weight
    kd_w = 0.0 if case.divergence == "ce" else 1.0 - w
    kd = temp**2 * rows[valid].mean()
    ce = ce_rows[valid].mean()
    return {"loss": kd_w * kd + w * ce, "kd": kd.detach(), "ce": ce.detach()}


def reference_top1(case: Case, inputs: dict) -> tuple[float, float]:
    """The share of counted positions where the student's largest real logit is the teacher's most likely id,
    as (lowest, highest) over the ways to break a tie for the teacher's top (sampled draws tie often)."""
    v = case.vocab
    if case.kind == "dense":
        teacher = inputs["teacher"][:, :v]
    elif case.kind in ("tail", "renorm", "sampled"):
        ids, values = ((inputs["ids"], inputs["logprobs"]) if case.kind != "sampled"
                       else (inputs["s_ids"], inputs["s_counts"].log()))
        teacher = torch.full((ids.shape[0], v + 1), float("-inf"), dtype=torch.float64)
        teacher.scatter_(1, torch.where(ids >= 0, ids, v), torch.where(ids >= 0, values.double(), float("-inf")))
        teacher = teacher[:, :v]
    else:
        return 0.0, 0.0  # no teacher: nothing to agree with
    tops = teacher == teacher.max(dim=-1, keepdim=True).values
    hit = tops.gather(1, inputs["student"][:, :v].argmax(dim=-1, keepdim=True)).squeeze(-1)
    valid = (inputs["labels"] != -100) & (inputs["mask"] != 0) if uses_labels(case) else torch.ones_like(hit)
    unique = tops.sum(-1) == 1
    count = valid.sum().item()
    return (hit & unique & valid).sum().item() / count, (hit & valid).sum().item() / count


def uses_labels(case: Case) -> bool:
    return case.divergence == "ce" or case.ce_weight > 0 or case.masked


def all_cases() -> list[Case]:
    """Every divergence × target kind that the loss accepts, at two settings each."""
    cases = []
    for div in ["kl", "rkl", "js", "tvd", "skew_kl", "skew_rkl"]:
        for kind in ["dense", "tail", "renorm"]:
            cases.append(Case(div, kind))
            cases.append(Case(div, kind, temperature=2.0, ce_weight=0.25, masked=True, seed=1))
    cases += [Case("kl", "sampled"), Case("kl", "sampled", temperature=2.0, ce_weight=0.5, masked=True, seed=2),
              Case("ce", "none", masked=True), Case("js", "tail", params=(("beta", 0.85),), seed=3),
              Case("skew_kl", "dense", params=(("alpha", 0.0),)), Case("skew_rkl", "tail", params=(("alpha", 0.0),))]
    return cases


def run_case(case, group, tp_rank: int, tp: int, chunk_size=None) -> dict:
    """This rank's part of one case: its loss, detached parts and gradient shard."""
    inputs = full_inputs(case)
    width = case.padded_vocab // tp
    lo, hi = tp_rank * width, (tp_rank + 1) * width
    student = inputs["student"][:, lo:hi].float().requires_grad_()
    labels = inputs["labels"] if uses_labels(case) else None
    out = distill_loss(student, shard_targets(case, inputs, lo, hi), divergence=case.divergence, tp_group=group,
                       temperature=case.temperature, labels=labels, loss_mask=inputs["mask"],
                       ce_weight=case.ce_weight, vocab_size=case.vocab, chunk_size=chunk_size, **dict(case.params))
    out.loss.backward()
    return {"loss": out.loss.item(), "kd": out.kd.item(), "ce": out.ce.item(),
            "top1": out.metrics["top1_agreement"].item(), "grad": student.grad}


def assert_matches_reference(case, per_rank: list[dict]) -> None:
    inputs = full_inputs(case)
    student = inputs["student"].clone().requires_grad_()
    ref = reference_loss(case, inputs, student)
    ref["loss"].backward()
    grad = torch.cat([r["grad"] for r in per_rank], dim=-1).double()
    for r in per_rank:
        assert r["loss"] == per_rank[0]["loss"], "every TP rank must return the same loss"
        torch.testing.assert_close(torch.tensor(r["loss"], dtype=torch.float64), ref["loss"].detach(), rtol=1e-5, atol=1e-7)
        if uses_labels(case):
            torch.testing.assert_close(torch.tensor(r["ce"], dtype=torch.float64), ref["ce"], rtol=1e-5, atol=1e-7)
    low, high = reference_top1(case, inputs)
    for r in per_rank:
        assert r["top1"] == per_rank[0]["top1"], "every TP rank must report the same top-1 agreement"
    assert low - 1e-6 <= per_rank[0]["top1"] <= high + 1e-6, (per_rank[0]["top1"], low, high)
    scale = student.grad.abs().max().item()
    torch.testing.assert_close(grad, student.grad, rtol=1e-5, atol=1e-5 * scale)
    assert grad[:, case.vocab:].abs().max() == 0, "padded vocabulary entries must get no gradient"


def linear_inputs(case: Case, hidden_size: int = 16, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [N, H] and an output weight [padded_vocab, H] whose logits are about as spread as a case's."""
    gen = torch.Generator().manual_seed(1000 + case.seed)
    hidden = torch.randn(case.tokens, hidden_size, generator=gen)
    weight = torch.randn(case.padded_vocab, hidden_size, generator=gen) * (1.5 / hidden_size**0.5)
    return hidden.to(dtype), weight.to(dtype)


def loss_kwargs(case: Case, inputs: dict, group=None, chunk_size=None) -> dict:
    """The keyword arguments of one case's loss call (either entry point)."""
    return dict(divergence=case.divergence, tp_group=group, temperature=case.temperature,
                labels=inputs["labels"] if uses_labels(case) else None, loss_mask=inputs["mask"],
                ce_weight=case.ce_weight, vocab_size=case.vocab, chunk_size=chunk_size, **dict(case.params))

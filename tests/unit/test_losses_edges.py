"""Edge cases and bad input for distill_loss: no NaN/inf, nothing modified, clear errors."""
from __future__ import annotations

import pytest
import torch

from pipeline.losses import DenseTargets, LossInputError, SampledTargets, SparseTargets, distill_loss

DIVERGENCES = ["kl", "rkl", "js", "tvd", "skew_kl", "skew_rkl"]
N, V, K = 5, 40, 4


def sparse_from(teacher_logits: torch.Tensor, k: int = K, mode: str = "tail") -> SparseTargets:
    log_p = teacher_logits.double().log_softmax(-1)
    top = log_p.topk(k, dim=-1)
    rest = log_p.scatter(1, top.indices, float("-inf")).logsumexp(-1)
    return SparseTargets(top.indices, top.values.float(), rest.float(), mode=mode)


def finite_loss_and_grad(student, targets, divergence, **kw):
    student = student.clone().requires_grad_()
    out = distill_loss(student, targets, divergence=divergence, **kw)
    out.loss.backward()
    assert torch.isfinite(out.loss), f"{divergence}: loss {out.loss}"
    assert torch.isfinite(student.grad).all(), f"{divergence}: non-finite gradient"
    return out, student.grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_one_hot_dense_teacher_is_finite(divergence):
    teacher = torch.full((N, V), float("-inf"))
    teacher[torch.arange(N), torch.arange(N)] = 0.0
    student = torch.randn(N, V)
    out, _ = finite_loss_and_grad(student, DenseTargets(teacher), divergence)
    if divergence == "kl":  # KL(onehot‖q) = −log q at the hot id
        expected = torch.nn.functional.cross_entropy(student, torch.arange(N))
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("mode", ["tail", "renorm"])
def test_zero_rest_mass_and_minus_inf_logprobs_are_finite(divergence, mode):
    ids = torch.arange(K).repeat(N, 1)
    logprobs = torch.tensor([0.0, float("-inf"), float("-inf"), float("-inf")]).repeat(N, 1)
    targets = SparseTargets(ids, logprobs, torch.full((N,), float("-inf")), mode=mode)
    finite_loss_and_grad(torch.randn(N, V), targets, divergence)


def test_equal_distributions_give_zero_divergence():
    logits = torch.randn(N, V)
    for divergence in DIVERGENCES:
        out, grad = finite_loss_and_grad(logits, DenseTargets(logits.clone()), divergence)
        assert out.loss.abs() < 1e-6 and grad.abs().max() < 1e-6, divergence


@pytest.mark.parametrize("kind", ["dense", "sparse", "sampled"])
def test_fully_masked_batch_gives_zero_loss_and_zero_grad(kind):
    teacher = torch.randn(N, V)
    targets = {"dense": DenseTargets(teacher), "sparse": sparse_from(teacher),
               "sampled": SampledTargets(torch.arange(K).repeat(N, 1), torch.ones(N, K))}[kind]
    out, grad = finite_loss_and_grad(torch.randn(N, V), targets, "kl", loss_mask=torch.zeros(N),
                                     labels=torch.zeros(N, dtype=torch.long), ce_weight=0.5)
    assert out.loss.item() == 0.0 and out.num_tokens == 0
    assert grad.abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_are_never_modified(dtype):
    student, teacher = torch.randn(N, V, dtype=dtype), torch.randn(N, V, dtype=dtype)
    before = (student.clone(), teacher.clone())
    targets = sparse_from(teacher.float())
    saved = (targets.ids.clone(), targets.logprobs.clone(), targets.log_rest.clone())
    for tgt in (DenseTargets(teacher), targets):
        for temperature in (1.0, 2.0):
            out = distill_loss(student.requires_grad_(), tgt, divergence="js", temperature=temperature
                               if isinstance(tgt, DenseTargets) else 1.0, labels=torch.zeros(N, dtype=torch.long),
                               ce_weight=0.3)
            out.loss.backward()
    assert torch.equal(student.detach(), before[0]) and torch.equal(teacher, before[1])
    assert all(torch.equal(a, b) for a, b in zip(saved, (targets.ids, targets.logprobs, targets.log_rest)))


def test_bf16_logits_agree_with_fp32():
    student, teacher = torch.randn(64, 512), torch.randn(64, 512)
    targets = sparse_from(teacher, k=16)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        x = student.detach().to(dtype).requires_grad_()
        out = distill_loss(x, targets, divergence="kl")
        out.loss.backward()
        assert x.grad.dtype == dtype and out.loss.dtype == torch.float32
        results.append((out.loss.item(), x.grad.float()))
    ref = distill_loss(student.bfloat16().float(), targets, divergence="kl").loss.item()
    assert results[1][0] == pytest.approx(ref, rel=1e-6), "bf16 inputs are accumulated in fp32"
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0.02, atol=2e-5)


def test_backward_scales_with_incoming_gradient():
    student, teacher = torch.randn(N, V), torch.randn(N, V)
    grads = []
    for factor in (1.0, 3.0):
        x = student.clone().requires_grad_()
        (factor * distill_loss(x, DenseTargets(teacher), divergence="tvd").loss).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], 3.0 * grads[0])


def test_metrics_report_agreement_and_parts():
    teacher = torch.randn(N, V)
    out = distill_loss(teacher.clone(), sparse_from(teacher), divergence="kl",
                       labels=teacher.argmax(-1), ce_weight=0.0)
    assert out.metrics["top1_agreement"].item() == 1.0
    assert out.ce.item() > 0 and out.kd.item() == pytest.approx(0.0, abs=1e-6)


def _call(**overrides):
    teacher = torch.randn(N, V)
    kwargs = dict(student_logits=torch.randn(N, V), targets=sparse_from(teacher), divergence="kl")
    kwargs.update(overrides)
    return distill_loss(kwargs.pop("student_logits"), kwargs.pop("targets"), **kwargs)


@pytest.mark.parametrize("overrides, message", [
    (dict(divergence="kld"), "unknown name 'kld'"),
    (dict(divergence="js", beta=1.0), "beta in (0.0, 1.0)"),
    (dict(divergence="skew_kl", alpha=1.0), "alpha in [0.0, 1.0)"),
    (dict(divergence="kl", beta=0.5), "unexpected parameter"),
    (dict(temperature=0.0), "temperature: expected a finite number > 0"),
    (dict(temperature=-1.0), "temperature: expected a finite number > 0"),
    (dict(temperature=2.0), "differs from the temperature the SparseTargets were made at"),
    (dict(ce_weight=1.5), "ce_weight: expected a number in [0, 1]"),
    (dict(ce_weight=0.5), "labels: required"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(student_logits=torch.randn(N + 1, V)), "SparseTargets.ids: expected shape (6, 'K')"),
    (dict(student_logits=torch.randint(0, 5, (N, V))), "student_logits: expected a floating-point tensor"),
    (dict(targets=SparseTargets(torch.full((N, K), V), torch.zeros(N, K), torch.zeros(N))), "id 40 is out of range"),
    (dict(targets=SparseTargets(torch.zeros(N, K), torch.zeros(N, K), torch.zeros(N))), "expected an int32 or int64"),
    (dict(targets=SparseTargets(torch.zeros(N, K, dtype=torch.long), torch.full((N, K), -3.0), torch.zeros(N))),
     "repeats an id"),
    (dict(targets=SparseTargets(torch.arange(K).repeat(N, 1), torch.full((N, K), -3.0), torch.full((N,), -3.0))),
     "total mass"),
    (dict(targets=DenseTargets(torch.randn(N, V - 1))), "DenseTargets.logits: expected the student's shape"),
    (dict(targets=DenseTargets(torch.randn(N, V, requires_grad=True))), "pass logits.detach()"),
    (dict(targets=SampledTargets(torch.arange(K).repeat(N, 1), torch.ones(N, K)), divergence="rkl"),
     "unbiased estimate of p only inside losses linear in p"),
    (dict(targets=SampledTargets(torch.arange(K).repeat(N, 1), -torch.ones(N, K))), "non-negative counts"),
    (dict(labels=torch.full((N,), V), ce_weight=0.5), "labels: value 40 is out of range"),
    (dict(labels=torch.zeros(N + 1, dtype=torch.long)), "labels: expected shape (5,)"),
    (dict(vocab_size=V + 1), "vocab_size: expected 0 < vocab_size ≤ Vl·tp"),
    (dict(targets=torch.randn(N, V)), "targets: expected DenseTargets, SparseTargets, SampledTargets or None"),
    (dict(targets=None), "targets: required for divergence 'kl'"),
])
def test_bad_input_is_a_clear_error(overrides, message):
    with pytest.raises(LossInputError) as error:
        _call(**overrides)
    assert message in str(error.value)


def test_ce_alone_needs_no_targets():
    student, labels = torch.randn(N, V), torch.randint(0, V, (N,))
    out = distill_loss(student, None, divergence="ce", labels=labels)
    expected = torch.nn.functional.cross_entropy(student, labels)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_second_backward_works_for_unit_gradient_and_is_refused_otherwise():
    student, teacher = torch.randn(N, V, requires_grad=True), torch.randn(N, V)
    loss = distill_loss(student, DenseTargets(teacher), divergence="kl").loss
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    loss.backward(retain_graph=True)
    torch.testing.assert_close(student.grad, 2 * first)
    scaled = 2.0 * distill_loss(student, DenseTargets(teacher), divergence="kl").loss
    scaled.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scaled.backward()


def test_divergence_is_reported_even_when_its_weight_is_zero():
    student, teacher = torch.randn(N, V), torch.randn(N, V)
    labels = torch.randint(0, V, (N,))
    pure_ce = distill_loss(student, DenseTargets(teacher), divergence="kl", labels=labels, ce_weight=1.0)
    pure_kd = distill_loss(student, DenseTargets(teacher), divergence="kl", labels=labels, ce_weight=0.0)
    assert pure_ce.kd.item() == pytest.approx(pure_kd.kd.item(), rel=1e-6) and pure_ce.kd > 0
    assert pure_ce.loss.item() == pytest.approx(pure_kd.ce.item(), rel=1e-6)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_formulas_in_reused_buffers_equal_fresh_ones_and_leave_their_inputs(divergence):
    """The dense kernel hands the per-outcome formulas one set of buffers for every chunk: a formula that
    read a buffer it had already overwritten, wrote into log_p or log_q, or returned a result living in a
    buffer another result then overwrote, would differ here from the fresh-buffer call."""
    from pipeline.losses.divergences import outcome_terms, resolve_divergence
    from pipeline.losses.shard import Scratch

    div, params = resolve_divergence(divergence, {})
    scratch = Scratch()

    def buf(name, dtype=None):
        return scratch.get(name, torch.empty(N, V), dtype or torch.float32)

    gen = torch.Generator().manual_seed(3)
    for _ in range(2):  # the second call reuses what the first left in the buffers
        log_p = torch.randn(N, V, generator=gen).mul(3).log_softmax(-1)
        log_p[0, :3] = float("-inf")  # zero teacher mass: the 0·log 0 and floor branches
        log_q = torch.randn(N, V, generator=gen).mul(3).log_softmax(-1)
        log_q[1] = log_p[1]  # equal rows: terms and W of exactly 0 for the symmetric parts
        before = (log_p.clone(), log_q.clone())
        fresh = outcome_terms(div, params, log_p, log_q)
        reused = outcome_terms(div, params, log_p, log_q, buf)
        assert torch.equal(log_p, before[0]) and torch.equal(log_q, before[1])
        for got, want in zip(reused, fresh):
            assert torch.equal(got, want)

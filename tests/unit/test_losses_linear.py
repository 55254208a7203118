"""distill_linear_loss on one process against distill_loss on the materialised logits `hidden @ weight.T`.

Every divergence × target kind of tests/reference.py (masks, CE mix, temperature, padded vocabulary
included) runs through both entry points; the fused one must give the same loss, parts, metrics and
gradients for the hidden states and the weight, untied and tied to an input embedding. gradcheck in
float64 checks the fused gradients against finite differences on their own.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.losses import DenseTargets, LossInputError, distill_linear_loss, distill_loss
from tests.reference import all_cases, full_inputs, linear_inputs, loss_kwargs, shard_targets

CASES = all_cases()
RTOL = 1e-5


def both_paths(case, hidden, weight, *, chunk_size=5, grad_scale=1.0, recompute=False, block_size=None):
    """(fused, unfused) results: loss parts, metrics and the gradients of hidden and weight."""
    inputs = full_inputs(case)
    targets = shard_targets(case, inputs, 0, case.padded_vocab, dtype=torch.float32)
    kwargs = loss_kwargs(case, inputs, chunk_size=chunk_size)
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = (distill_linear_loss(h, w, targets, recompute=recompute, block_size=block_size, **kwargs) if fused
               else distill_loss(h @ w.T, targets, **kwargs))
        (out.loss * grad_scale).backward()
        results.append({"loss": out.loss.detach(), "kd": out.kd, "ce": out.ce, "num_tokens": out.num_tokens,
                        **{k: v for k, v in out.metrics.items()}, "grad_hidden": h.grad, "grad_weight": w.grad})
    return results


def assert_same(fused: dict, unfused: dict, rtol=RTOL) -> None:
    assert fused["num_tokens"] == unfused["num_tokens"]
    for key in ("loss", "kd", "ce", "divergence", "top1_agreement", "valid_tokens"):
        torch.testing.assert_close(fused[key], unfused[key], rtol=rtol, atol=1e-7, msg=key)
    for key in ("grad_hidden", "grad_weight"):
        scale = unfused[key].abs().max().item()
        torch.testing.assert_close(fused[key], unfused[key], rtol=rtol, atol=rtol * scale, msg=key)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_unfused_on_materialised_logits(case):
    """Blocks of 7 rows, kernel chunks of 5: several blocks, each ending in a short chunk."""
    fused, unfused = both_paths(case, *linear_inputs(case), block_size=7)
    assert_same(fused, unfused)
    assert unfused["loss"] > 0 and unfused["grad_weight"].abs().max() > 0  # not a vacuous comparison
    assert fused["grad_weight"][case.vocab:].abs().max() == 0, "padding rows of the weight get no gradient"


@pytest.mark.parametrize("case", CASES[::5], ids=[c.name for c in CASES[::5]])
def test_recompute_and_incoming_gradient_scale(case):
    fused, unfused = both_paths(case, *linear_inputs(case), grad_scale=3.0, recompute=True)
    assert_same(fused, unfused)
    forward_fused, _ = both_paths(case, *linear_inputs(case), grad_scale=3.0)
    assert_same(forward_fused, unfused)


@pytest.mark.parametrize("case", CASES[1::4], ids=[c.name for c in CASES[1::4]])
def test_tied_embedding_gradient_accumulates_both_uses(case):
    """hidden = tanh(E[tokens]·M) and logits = hidden·Eᵀ with one Parameter E: E's gradient has both parts."""
    inputs = full_inputs(case)
    targets = shard_targets(case, inputs, 0, case.padded_vocab, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    _, embedding = linear_inputs(case)
    mixer = torch.randn(embedding.shape[1], embedding.shape[1], generator=gen) / 2
    tokens = torch.randint(0, case.vocab, (case.tokens,), generator=gen)
    grads, losses = [], []
    for fused in (True, False):
        table = embedding.clone().requires_grad_()
        hidden = torch.tanh(table[tokens] @ mixer)
        kwargs = loss_kwargs(case, inputs, chunk_size=4)
        out = distill_linear_loss(hidden, table, targets, **kwargs) if fused else \
            distill_loss(hidden @ table.T, targets, **kwargs)
        out.loss.backward()
        grads.append(table.grad)
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=RTOL, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[1], rtol=RTOL, atol=RTOL * grads[1].abs().max().item())
    assert grads[0][tokens].abs().max() > 0


def test_batch_shaped_hidden_and_frozen_weight():
    case = CASES[1]
    inputs = full_inputs(case)
    hidden, weight = linear_inputs(case)
    targets = shard_targets(case, inputs, 0, case.padded_vocab)
    h = hidden.clone().requires_grad_()
    flat = distill_linear_loss(h, weight, targets, **loss_kwargs(case, inputs))
    flat.loss.backward()
    shaped_inputs = {k: v.reshape(3, 4, *v.shape[1:]) for k, v in inputs.items() if k in ("labels", "mask", "teacher")}
    h3 = hidden.reshape(3, 4, -1).clone().requires_grad_()
    shaped = distill_linear_loss(h3, weight, DenseTargets(shaped_inputs["teacher"].float()), divergence=case.divergence,
                                 temperature=case.temperature, labels=shaped_inputs["labels"],
                                 loss_mask=shaped_inputs["mask"], ce_weight=case.ce_weight, vocab_size=case.vocab)
    shaped.loss.backward()
    assert case.kind == "dense"
    torch.testing.assert_close(shaped.loss, flat.loss, rtol=RTOL, atol=0)
    torch.testing.assert_close(h3.grad.reshape(h.shape), h.grad, rtol=RTOL, atol=RTOL * h.grad.abs().max().item())


GRADCHECK = [c for c in CASES if c.masked or c.kind in ("sampled", "none")][::3]


@pytest.mark.parametrize("case", GRADCHECK, ids=[c.name for c in GRADCHECK])
def test_gradcheck_float64_hidden_and_weight(case):
    inputs = full_inputs(case)
    targets = shard_targets(case, inputs, 0, case.padded_vocab, dtype=torch.float64)
    hidden, weight = linear_inputs(case, hidden_size=4, dtype=torch.float64)
    kwargs = loss_kwargs(case, inputs, chunk_size=5)

    def loss(h, w):
        return distill_linear_loss(h, w, targets, **kwargs).loss

    assert torch.autograd.gradcheck(loss, (hidden.requires_grad_(), weight.requires_grad_()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", CASES[:6:2] + CASES[-6:-4], ids=[c.name for c in CASES[:6:2] + CASES[-6:-4]])
def test_bf16_inputs_accumulate_in_fp32(case):
    """bf16 hidden and weight: the loss equals fp32 on the same (rounded) values, the gradients come back
    in bf16 and close to fp32's."""
    hidden, weight = (t.bfloat16() for t in linear_inputs(case))
    inputs = full_inputs(case)
    targets = shard_targets(case, inputs, 0, case.padded_vocab)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = distill_linear_loss(h, w, targets, **loss_kwargs(case, inputs, chunk_size=5))
    out.loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    fused32, unfused32 = both_paths(case, hidden.float(), weight.float())
    torch.testing.assert_close(out.loss.float(), unfused32["loss"], rtol=RTOL, atol=1e-6)
    for key, got in (("grad_hidden", h.grad), ("grad_weight", w.grad)):
        ref = unfused32[key]
        torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item(), msg=key)


@pytest.mark.parametrize("hidden, weight, message", [
    (torch.ones(4, 3, dtype=torch.long), torch.ones(8, 3), "hidden: expected a floating-point"),
    (torch.ones(4, 3), torch.ones(8, 5), "weight: expected shape [Vl, H]"),
    (torch.ones(3), torch.ones(8, 3), "hidden: expected shape [..., H]"),
])
def test_bad_inputs_are_named(hidden, weight, message):
    with pytest.raises(LossInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        distill_linear_loss(hidden, weight, None, divergence="ce", labels=torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("block_size", [0, 2.5, True])
def test_bad_block_size_is_named(block_size):
    with pytest.raises(LossInputError, match="block_size: expected None"):
        distill_linear_loss(torch.ones(4, 3), torch.ones(8, 3), None, divergence="ce",
                            labels=torch.zeros(4, dtype=torch.long), block_size=block_size)


def test_hidden_gradient_keeps_the_layout_of_a_transposed_view():
    """megatron's [S, B, H] states reach the loss as a [B, S, H] view; the gradient must come back contiguous
    in [S, B, H] order, as autograd's own ops do (megatron's TP all-reduce drops a non-contiguous gradient)."""
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(5, 3, 8, generator=gen, requires_grad=True)  # [S, B, H]
    weight = torch.randn(11, 8, generator=gen)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    captured = []
    view = states.transpose(0, 1)
    view.register_hook(lambda g: captured.append(g))
    distill_linear_loss(view, weight, None, divergence="ce", labels=labels).loss.backward()
    assert captured[0].stride() == view.stride() and states.grad.is_contiguous()
    plain = states.detach().clone().requires_grad_()
    distill_loss(plain.transpose(0, 1) @ weight.T, None, divergence="ce", labels=labels).loss.backward()
    torch.testing.assert_close(states.grad, plain.grad, rtol=1e-5, atol=1e-7)

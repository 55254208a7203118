"""The loss on CUDA (fp32 and bf16 logits) against the float64 CPU reference; skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from pipeline.losses import distill_loss
from tests.reference import all_cases, full_inputs, reference_loss, shard_targets, uses_labels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CASES = all_cases()


def _on_cuda(targets):
    if targets is None:
        return None
    fields = {name: getattr(targets, name) for name in targets.__dataclass_fields__}
    return type(targets)(**{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in fields.items()})


@pytest.mark.parametrize("dtype, grad_tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 8e-3)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cuda_matches_float64_reference(case, dtype, grad_tolerance):
    """Reductions run in fp32 whatever the logits' dtype: the loss matches to 1e-5 even for bf16
    inputs (the reference sees the same bf16-rounded values); the gradient is rounded to bf16 once."""
    inputs = full_inputs(case)
    student = inputs["student"].to(dtype)
    reference_student = student.double().requires_grad_()
    ref = reference_loss(case, inputs, reference_student)
    ref["loss"].backward()
    x = student.cuda().requires_grad_()
    labels = inputs["labels"].cuda() if uses_labels(case) else None
    out = distill_loss(x, _on_cuda(shard_targets(case, inputs, 0, case.padded_vocab)), divergence=case.divergence,
                       temperature=case.temperature, labels=labels, loss_mask=inputs["mask"].cuda(),
                       ce_weight=case.ce_weight, vocab_size=case.vocab, **dict(case.params))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and x.grad.dtype == dtype
    assert out.loss.item() == pytest.approx(ref["loss"].item(), rel=1e-5, abs=1e-7)
    scale = reference_student.grad.abs().max().item()
    torch.testing.assert_close(x.grad.double().cpu(), reference_student.grad, rtol=grad_tolerance,
                               atol=grad_tolerance * scale)

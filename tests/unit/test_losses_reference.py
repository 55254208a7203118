"""distill_loss on one process (tp = 1) against the float64 reference, and gradcheck in float64."""
from __future__ import annotations

import pytest
import torch

from pipeline.losses import distill_loss
from tests.reference import all_cases, assert_matches_reference, full_inputs, run_case, shard_targets, uses_labels

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tp1_matches_float64_reference(case):
    assert_matches_reference(case, [run_case(case, None, 0, 1)])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_one_row_chunks_change_nothing(case):
    whole, rows = run_case(case, None, 0, 1), run_case(case, None, 0, 1, chunk_size=1)
    assert rows["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    torch.testing.assert_close(rows["grad"], whole["grad"], rtol=1e-6, atol=1e-6 * whole["grad"].abs().max().item())


DENSE_FORMULA_CASES = [c for c in CASES if c.kind == "dense" and c.divergence != "kl"]


@pytest.mark.parametrize("case", DENSE_FORMULA_CASES, ids=[c.name for c in DENSE_FORMULA_CASES])
def test_dense_formulas_in_row_blocks_change_nothing(case, monkeypatch):
    """Dense targets run the per-outcome formulas in row blocks inside a chunk, W written over log q: blocks of
    2 rows (and a last one of 1 row, in chunks of 5 of 12 rows) must give what whole chunks give, and the
    reference. Not bit for bit: a block's length moves elements between the vectorised and the scalar tail
    of torch's transcendental kernels (logaddexp), which differ in the last ulp."""
    import pipeline.losses.dense as dense

    whole = run_case(case, None, 0, 1, chunk_size=5)
    monkeypatch.setattr(dense, "CPU_FORMULA_ELEMENTS", 2 * case.vocab)
    blocks = run_case(case, None, 0, 1, chunk_size=5)
    assert blocks["loss"] == pytest.approx(whole["loss"], rel=1e-6) and blocks["top1"] == whole["top1"]
    torch.testing.assert_close(blocks["grad"], whole["grad"], rtol=1e-6, atol=1e-6 * whole["grad"].abs().max().item())
    assert_matches_reference(case, [blocks])


@pytest.mark.parametrize("case", CASES[::3], ids=[c.name for c in CASES[::3]])
def test_gradcheck_float64(case):
    inputs = full_inputs(case)
    targets = shard_targets(case, inputs, 0, case.padded_vocab, dtype=torch.float64)
    labels = inputs["labels"] if uses_labels(case) else None
    student = inputs["student"][:4].clone().requires_grad_()
    keep = slice(0, 4)

    def loss(x):
        return distill_loss(x, _first_rows(targets, keep), divergence=case.divergence, temperature=case.temperature,
                            labels=None if labels is None else labels[keep], loss_mask=inputs["mask"][keep],
                            ce_weight=case.ce_weight, vocab_size=case.vocab, **dict(case.params)).loss

    assert torch.autograd.gradcheck(loss, (student,), eps=1e-6, atol=1e-6)


def _first_rows(targets, rows):
    if targets is None:
        return None
    fields = {name: getattr(targets, name) for name in targets.__dataclass_fields__}
    return type(targets)(**{k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in fields.items()})

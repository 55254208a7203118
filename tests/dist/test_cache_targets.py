"""Teacher-cache targets at TP = 1, 2 and 4 against the gathered logits, and sampled draws' statistics.

The parent builds full-vocabulary logits (with padded columns, a row with ties and a very peaked row),
each rank takes its contiguous slice, and the targets must equal what the full logits give: the top-K
ids exactly, log-probs and log rest mass to float64-reference tolerance, and the sampled draws
identical at every TP size. A chi-square test over many draws on a small vocabulary checks that the
draws follow the teacher's distribution at temperature T.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.teacher.targets import integer_weights, sampled_targets, topk_targets, unique_counts, weight_bits
from tests.harness import run_distributed

VOCAB, PADDED, ROWS = 301, 320, 24
K_VALUES = (1, 8, 40)
TEMPERATURES = (1.0, 2.0)
DRAWS = 50


def make_logits(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(ROWS, PADDED, generator=g) * 3
    logits[:, VOCAB:] = 50.0  # padding columns: must never be chosen
    logits[1, :VOCAB] = 0.0  # a flat row (all ties)
    logits[2, 7] = 60.0  # nearly all mass on one id: the rest is ~e^-60, where 1 − Σp would be 0
    return logits


def make_uniforms(seed: int = 11) -> torch.Tensor:
    return torch.rand(ROWS, DRAWS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def compute(logits: torch.Tensor, group) -> dict:
    out = {}
    for temp in TEMPERATURES:
        for k in K_VALUES:
            out[("topk", k, temp)] = topk_targets(logits, k=k, temperature=temp, vocab_size=VOCAB, group=group,
                                                  chunk_bytes=4096)
        out[("sampled", temp)] = sampled_targets(logits, make_uniforms(), temperature=temp, vocab_size=VOCAB,
                                                 group=group, chunk_bytes=4096)
    return out


def tp_worker(rank: int, world: int) -> dict:
    width = PADDED // world
    return compute(make_logits()[:, rank * width: (rank + 1) * width], dist.group.WORLD)


@pytest.fixture(scope="module")
def by_tp():
    results = {1: compute(make_logits(), None)}
    for tp in (2, 4):
        ranks = run_distributed(tp_worker, tp)
        for other in ranks[1:]:
            for key, value in other.items():
                assert all(torch.equal(a, b) for a, b in zip(value, ranks[0][key])), f"ranks disagree on {key}"
        results[tp] = ranks[0]
    return results


def reference_topk(k: int, temp: float):
    logp = torch.log_softmax(make_logits()[:, :VOCAB].double() / temp, dim=-1)
    ids = logp.topk(k, dim=-1).indices.sort(dim=-1).values
    picked = logp.gather(-1, ids)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(dim=-1)
    return ids, picked, rest


@pytest.mark.dist
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("temp", TEMPERATURES)
@pytest.mark.parametrize("k", K_VALUES)
def test_topk_matches_gathered_logits(by_tp, tp, k, temp):
    ids, logprobs, log_rest = by_tp[tp][("topk", k, temp)]
    want_ids, _, want_rest = reference_topk(k, temp)
    clear = torch.ones(ROWS, dtype=torch.bool)
    clear[1] = False  # the flat row: any K of the tied ids is a correct top-K
    assert torch.equal(ids[clear], want_ids[clear])
    assert ids.max() < VOCAB and (ids[:, 1:] > ids[:, :-1]).all()
    torch.testing.assert_close(logprobs.double(), make_logits()[:, :VOCAB].double().div(temp)
                               .log_softmax(-1).gather(-1, ids), rtol=0, atol=2e-5)
    finite = torch.isfinite(want_rest)
    torch.testing.assert_close(log_rest.double()[finite], want_rest[finite], rtol=1e-5, atol=2e-5)
    assert -60 < log_rest[2] < -20, "the rest mass of the peaked row must come from the non-K entries, not 1 − Σp"


@pytest.mark.dist
@pytest.mark.parametrize("temp", TEMPERATURES)
def test_sampled_identical_across_tp(by_tp, temp):
    base_ids, base_counts = by_tp[1][("sampled", temp)]
    assert (base_counts.sum(-1) == DRAWS).all()
    assert base_ids.max() < VOCAB
    for tp in (2, 4):
        ids, counts = by_tp[tp][("sampled", temp)]
        assert torch.equal(ids, base_ids) and torch.equal(counts, base_counts), f"tp={tp} drew differently"


@pytest.mark.parametrize("temp", TEMPERATURES)
def test_sampled_draws_follow_the_teacher(temp):
    """Chi-square goodness of fit of 60,000 draws from one row against softmax(z/T) over 12 ids."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, 0.7, 1.2, 9.0, 9.0, 9.0, 9.0]])
    vocab, rows, draws = 12, 600, 100
    uniforms = torch.rand(rows, draws, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ids, counts = sampled_targets(logits.expand(rows, -1), uniforms, temperature=temp, vocab_size=vocab)
    observed = torch.zeros(vocab, dtype=torch.float64).index_add_(0, ids[ids >= 0], counts[ids >= 0].double())
    expected = torch.softmax(logits[0, :vocab].double() / temp, dim=-1) * rows * draws
    statistic = ((observed - expected) ** 2 / expected).sum()
    p_value = float(torch.special.gammaincc(torch.tensor((vocab - 1) / 2.0), statistic / 2))  # chi-square sf
    assert p_value > 1e-3, f"draws do not follow the teacher (p = {p_value:.2g}): {observed} vs {expected}"


def test_integer_weights_track_exp():
    x = -torch.linspace(0, 40, 100001)
    bits = weight_bits(32000)
    exact = torch.exp(x.double()) * 2.0**bits
    got = integer_weights(x, bits).double()
    kept = exact >= 2
    assert torch.all((got[kept] - exact[kept]).abs() <= exact[kept] * 1e-5 + 1)
    assert (got[exact < 0.25] == 0).all() and got.max() == 2**bits


def test_integer_weights_do_not_depend_on_the_split():
    x = -torch.rand(7, 1003) * 30
    whole = integer_weights(x, 30)
    parts = torch.cat([integer_weights(x[:, i: i + 17].contiguous(), 30) for i in range(0, 1003, 17)], dim=1)
    assert torch.equal(whole, parts)


def test_unique_counts_packs_left():
    ids, counts = unique_counts(torch.tensor([[5, 3, 5, 5, 0], [2, 2, 2, 2, 2]]))
    assert ids.tolist() == [[0, 3, 5, -1, -1], [2, -1, -1, -1, -1]]
    assert counts.tolist() == [[1, 1, 3, 0, 0], [5, 0, 0, 0, 0]]

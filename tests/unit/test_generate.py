"""Incremental decoding against `transformers` and a full forward; sampling against the softmax it draws from."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import SamplingConfig
from pipeline.generate import Decoder, generate, next_tokens
from pipeline.model import load_hf
from tests.modelmaker import VOCAB, make_hf_model

KINDS = ("llama_gqa", "qwen2", "mistral")
LENGTHS = (7, 12, 3, 9)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: (root / kind, make_hf_model(kind, root / kind)) for kind in KINDS}


def _prompts(seed: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in LENGTHS]


@torch.no_grad()
def _hf_greedy(model, prompt: torch.Tensor, new: int, eos_id=None) -> list[int]:
    out = model.generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                         do_sample=False, max_new_tokens=new, eos_token_id=eos_id, pad_token_id=0)
    ids = out[0, prompt.numel():].tolist()
    return ids[: ids.index(eos_id) + 1] if eos_id is not None and eos_id in ids else ids


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_transformers_with_eos_mid_batch(kind, models, ctx):
    folder, reference = models[kind]
    prompts = _prompts()
    free = [_hf_greedy(reference, p, 10) for p in prompts]
    eos = free[0][3]  # row 0 stops after 4 tokens; the others run on unless they meet it too
    expected = [_hf_greedy(reference, p, 10, eos) for p in prompts]
    assert len(expected[0]) == 4 and any(len(e) == 10 for e in expected)
    model = load_hf(folder, ctx)
    result = generate(model, prompts, [f"k{i}" for i in range(len(prompts))],
                      SamplingConfig(mode="greedy", max_new_tokens=10), vocab_size=VOCAB, eos_id=eos)
    assert [t.tolist() for t in result.tokens] == expected
    assert result.ended == [e[-1] == eos for e in expected]


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_logits_equal_a_full_forward(kind, models, ctx):
    model = load_hf(models[kind][0], ctx).eval()
    prompts = _prompts(seed=5)
    decoder = Decoder(model, prompts, max_new_tokens=8)
    steps, fed = [], []
    with torch.no_grad():
        logits = decoder.prefill()
        for _ in range(8):
            steps.append(logits)
            token = (logits[:, :VOCAB] * 0.37).sin().argmax(-1)  # any tokens, not just the greedy ones
            fed.append(token)
            logits = decoder.step(token)
        for row, prompt in enumerate(prompts):
            sequence = torch.cat([prompt, torch.stack([t[row] for t in fed])])
            full = model(sequence[None])[0, prompt.numel() - 1: prompt.numel() + 7]
            incremental = torch.stack([s[row] for s in steps])
            torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))


def test_the_logits_observer_sees_every_real_position_once_as_a_full_forward_computes_it(models, ctx):
    model = load_hf(models["llama_gqa"][0], ctx).eval()
    prompts, keys = _prompts(seed=6), ["a", "b", "c", "d"]
    sampling = SamplingConfig(top_k=30, max_new_tokens=6)
    plain = generate(model, prompts, keys, sampling, vocab_size=VOCAB, eos_id=None, seed=4)
    eos = int(plain.tokens[1][2])  # row 1 stops after 3 tokens; the draws do not depend on the EOS id
    seen = {}

    def on_logits(rows, positions, logits):
        assert rows.shape == positions.shape == logits.shape[:1] and rows.dtype == positions.dtype == torch.int64
        for row, position, row_logits in zip(rows.tolist(), positions.tolist(), logits):
            assert (row, position) not in seen, f"row {row} position {position} seen twice"
            seen[row, position] = row_logits.clone()

    observed = generate(model, prompts, keys, sampling, vocab_size=VOCAB, eos_id=eos, seed=4, on_logits=on_logits)
    assert len(observed.tokens[1]) == 3 and observed.ended[1] and any(len(t) == 6 for t in observed.tokens)
    assert all(torch.equal(a, b[: len(a)]) for a, b in zip(observed.tokens, plain.tokens)), "the tokens changed"
    with torch.no_grad():
        for row, (prompt, new) in enumerate(zip(prompts, observed.tokens)):
            sequence = torch.cat([prompt, new])
            ordered = sorted(position for r, position in seen if r == row)
            assert ordered == list(range(len(sequence) - 1)), f"row {row}: the last token is never fed, no other gap"
            full = model(sequence[None])[0, :-1]
            incremental = torch.stack([seen[row, t] for t in ordered])
            torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))


def test_a_row_generates_the_same_tokens_in_any_batch(models, ctx):
    model = load_hf(models["llama_gqa"][0], ctx)
    prompts, keys = _prompts(), ["a", "b", "c", "d"]
    sampling = SamplingConfig(top_k=30, max_new_tokens=6)
    together = generate(model, prompts, keys, sampling, vocab_size=VOCAB, eos_id=None, seed=9)
    alone = [generate(model, [p], [k], sampling, vocab_size=VOCAB, eos_id=None, seed=9).tokens[0]
             for p, k in zip(prompts, keys)]
    assert all(torch.equal(a, b) for a, b in zip(together.tokens, alone))
    other_seed = generate(model, prompts, keys, sampling, vocab_size=VOCAB, eos_id=None, seed=10)
    assert not all(torch.equal(a, b) for a, b in zip(together.tokens, other_seed.tokens))


# ------------------------------------------------------------------ sampling from fixed logits

DRAWS = 20000


def _draw(logits: torch.Tensor, sampling: SamplingConfig, vocab_size: int) -> torch.Tensor:
    uniforms = torch.rand(DRAWS, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    return next_tokens(logits.expand(DRAWS, -1), uniforms, sampling, vocab_size=vocab_size)


def _chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's statistic below the 0.999 quantile (Wilson–Hilferty) for the support's degrees of freedom."""
    support = probs > 0
    expected = probs[support] * counts.sum()
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat < limit


LOGITS = torch.tensor([[2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.4, -1.0, -2.0, -3.0, 55.0, 60.0]])  # last 2: padding


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.7), SamplingConfig(top_k=4),
                                      SamplingConfig(top_p=0.8), SamplingConfig(top_k=6, top_p=0.7,
                                                                                temperature=1.5)],
                         ids=["plain", "temperature", "top_k", "top_p", "all"])
def test_draws_follow_the_restricted_softmax(sampling):
    z = LOGITS[0, :10] / sampling.temperature
    probs = z.double().softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros(10, dtype=torch.bool)
    if sampling.top_k:
        keep[order[: sampling.top_k]] = True
    else:
        keep[:] = True
    if sampling.top_p < 1:
        restricted = torch.where(keep, probs, torch.zeros_like(probs))
        restricted = restricted / restricted.sum()
        before = restricted[order].cumsum(0) - restricted[order]
        nucleus = torch.zeros(10, dtype=torch.bool)
        nucleus[order[before < sampling.top_p]] = True
        keep &= nucleus
    expected = torch.where(keep, probs, torch.zeros_like(probs))
    expected = expected / expected.sum()
    ids = _draw(LOGITS, sampling, vocab_size=10)
    counts = torch.bincount(ids, minlength=12).double()
    assert counts[10:].sum() == 0, "a padding id was drawn"
    assert counts[:10][~keep].sum() == 0, "an id outside the top-k / top-p set was drawn"
    assert _chi_square_ok(counts[:10], expected)


def test_chi_square_rejects_the_wrong_distribution():
    """The test above can fail: draws at T=1 do not pass for the T=0.7 softmax."""
    ids = _draw(LOGITS, SamplingConfig(), vocab_size=10)
    counts = torch.bincount(ids, minlength=12).double()[:10]
    assert not _chi_square_ok(counts, (LOGITS[0, :10] / 0.7).double().softmax(-1))


def test_greedy_takes_the_lowest_id_of_a_tie_and_skips_padding():
    logits = torch.tensor([[1.0, 3.0, 0.5, 3.0, 9.0], [0.0, -1.0, 2.0, 2.0, 9.0]])
    ids = next_tokens(logits, torch.zeros(2, dtype=torch.float64), SamplingConfig(mode="greedy"), vocab_size=4)
    assert ids.tolist() == [1, 2]


def test_top_p_on_a_flat_distribution_needs_more_than_the_first_candidates():
    """With 300 nearly equal ids, p = 0.9 keeps about 270: more than the first 64 candidates."""
    logits = torch.linspace(0.0, 0.05, 300)[None]
    ids = _draw(logits, SamplingConfig(top_p=0.9), vocab_size=300)
    probs = logits[0].double().softmax(-1)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]
    kept = set(order[before < 0.9].tolist())
    assert len(kept) > 200 and set(ids.tolist()) <= kept
    assert len(set(ids.tolist())) > 200


def test_per_row_limits_cut_each_row_and_keep_its_draws(models, ctx):
    """A row capped at n new tokens yields the first n tokens it yields uncapped (same draws), and leaves
    the batch then; EOS still ends a row before its cap."""
    model = load_hf(models["llama_gqa"][0], ctx)
    prompts, keys = _prompts(), ["a", "b", "c", "d"]
    sampling = SamplingConfig(top_k=30, max_new_tokens=9)
    free = generate(model, prompts, keys, sampling, vocab_size=VOCAB, eos_id=None, seed=4)
    capped = generate(model, prompts, keys, sampling, vocab_size=VOCAB, eos_id=None, seed=4, limits=[2, 9, 5, 1])
    assert [t.tolist() for t in capped.tokens] == [t[:n].tolist() for t, n in zip(free.tokens, [2, 9, 5, 1])]
    assert capped.ended == [False] * 4
    eos = int(free.tokens[2][1])
    stopped = generate(model, prompts, keys, sampling, vocab_size=VOCAB, eos_id=eos, seed=4, limits=[2, 9, 5, 1])
    assert stopped.tokens[2].tolist()[-1] == eos and stopped.ended[2]
    with pytest.raises(ValueError, match="limits"):
        generate(model, prompts, keys, sampling, vocab_size=VOCAB, eos_id=None, limits=[1, 2])

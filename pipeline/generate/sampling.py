"""The next token of each row from vocabulary-parallel logits, never gathering the vocabulary.

Each TP rank holds the logits of its vocabulary slice `[B, Vl]` (padding ids sliced away first, as in
losses/shard.py). Every mode ends with the same id on every rank of the group:

- greedy: each rank's local maximum and its global id are all-gathered (`tp` pairs per row); the
  largest wins, ties to the lowest id, as `argmax` over the full row would.
- sample (no top_k, no top_p): one draw by inverse CDF with the cache job's exact integer weights
  (`teacher/targets.py`), so the same logits and uniform give the same id at every TP size.
- top_k / top_p: the global top-C candidates are merged from each rank's local top-C (`tp·C` values per
  row), as the cache job's top-K merge does. top_p keeps the most likely candidates until their mass
  reaches p, the mass measured against the full-vocabulary normaliser (one MAX and one SUM all-reduce)
  or, after a top_k, against the k candidates (temperature, then top_k, then top_p, as `transformers`
  applies them). Without a top_k, C starts at 64 and doubles while some row's candidates hold less than
  p. The draw among the kept candidates uses the same integer weights.

The uniform of each draw comes from the caller (seeded by the sample's key and the step), so a rerun
and another TP size draw the same tokens. The costs: the integer weights move a probability by at
most a factor 1 ± 5·10^-6 and never draw ids below 2^-(s+1) of the top (s ≥ 20); top_p without
top_k can take several rounds of candidates when the distribution is flat.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.config import SamplingConfig
from pipeline.losses.shard import Shard, all_reduce, row_max
from pipeline.teacher.targets import _all_gather, _local_candidates, integer_weights, sampled_targets, weight_bits

FIRST_CANDIDATES = 64


def next_tokens(logits: Tensor, uniforms: Tensor, sampling: SamplingConfig, *, vocab_size: int,
                group=None) -> Tensor:
    """[B] int64 global ids, one per row of this rank's logits `[B, Vl]`; `uniforms` [B] float64 in [0, 1),
    identical on every rank of `group`, decide the draws (unused by greedy)."""
    if logits.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=logits.device)
    if sampling.mode == "greedy":
        return greedy(logits, vocab_size=vocab_size, group=group)
    uniforms = uniforms.to(device=logits.device, dtype=torch.float64)
    if sampling.top_k == 0 and sampling.top_p >= 1.0:
        ids, _ = sampled_targets(logits, uniforms[:, None], temperature=sampling.temperature,
                                 vocab_size=vocab_size, group=group)
        return ids[:, 0]
    return _restricted(logits, uniforms, sampling, Shard.of(logits.shape[-1], vocab_size, group))


def greedy(logits: Tensor, *, vocab_size: int, group=None) -> Tensor:
    """[B] the global argmax of each row (ties to the lowest id)."""
    shard = Shard.of(logits.shape[-1], vocab_size, group)
    z = logits[:, : shard.width].float()
    if shard.width:
        value, index = z.max(dim=-1)
    else:
        value = z.new_full((z.shape[0],), float("-inf"))
        index = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
    values, ids = _all_gather(value, shard.group), _all_gather(index + shard.start, shard.group)   # [tp, B]
    best = values.max(dim=0).values
    return torch.where(values == best, ids, torch.full_like(ids, shard.vocab_size)).min(dim=0).values


def _candidates(z: Tensor, count: int, shard: Shard) -> tuple[Tensor, Tensor]:
    """The global top-`count` (values, ids) of each row, values descending, identical on every rank."""
    values, ids = (_all_gather(t, shard.group) for t in _local_candidates(z, count, shard))
    merged_z = values.permute(1, 0, 2).reshape(z.shape[0], -1)
    merged_ids = ids.permute(1, 0, 2).reshape(z.shape[0], -1)
    best, slot = merged_z.topk(count, dim=-1)
    return best, merged_ids.gather(-1, slot)


def _log_normaliser(z: Tensor, shard: Shard) -> Tensor:
    """[B] float64 log Σ exp(z) over the full vocabulary."""
    top = all_reduce(row_max(z), "max", shard.group)
    total = all_reduce((z - top[:, None]).exp().sum(dim=-1, dtype=torch.float64), "sum", shard.group)
    return total.log() + top.double()


def _restricted(logits: Tensor, uniforms: Tensor, sampling: SamplingConfig, shard: Shard) -> Tensor:
    z = logits[:, : shard.width].float()
    z = z / sampling.temperature if sampling.temperature != 1.0 else z
    count = min(sampling.top_k, shard.vocab_size) if sampling.top_k else min(FIRST_CANDIDATES, shard.vocab_size)
    log_total = None if sampling.top_k or sampling.top_p >= 1.0 else _log_normaliser(z, shard)
    while True:
        values, ids = _candidates(z, count, shard)
        keep = torch.ones_like(values, dtype=torch.bool)
        if sampling.top_p < 1.0:
            norm = values.double().logsumexp(dim=-1) if log_total is None else log_total
            probs = (values.double() - norm[:, None]).exp()
            before = probs.cumsum(dim=-1) - probs
            keep = before < sampling.top_p
            short = keep[:, -1] & (probs.sum(dim=-1) < sampling.top_p)
            if log_total is not None and count < shard.vocab_size and bool(short.any()):
                count = min(2 * count, shard.vocab_size)
                continue
        return _draw(values, ids, keep, uniforms, shard.vocab_size)


def _draw(values: Tensor, ids: Tensor, keep: Tensor, uniforms: Tensor, vocab_size: int) -> Tensor:
    """One id per row among the kept candidates, by inverse CDF over exact integer weights."""
    weights = integer_weights(values - values[:, :1], weight_bits(vocab_size))
    weights = torch.where(keep, weights, torch.zeros_like(weights))
    cumulative = weights.cumsum(dim=-1)
    picks = (uniforms * cumulative[:, -1].double()).floor().long()
    slot = torch.searchsorted(cumulative, picks[:, None], right=True).clamp_(max=ids.shape[1] - 1)
    return ids.gather(-1, slot)[:, 0]

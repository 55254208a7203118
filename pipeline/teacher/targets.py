"""Sparse teacher targets from vocab-parallel logits, without ever gathering the vocabulary.

Each TP rank holds the logits of its vocabulary slice `[N, Vl]` (the contiguous split of losses/shard.py; ids at
or above the real vocabulary are padding and are sliced away first). Two kinds of target:

- `topk_targets`: every rank takes its local top-K, the `tp·K` candidates are all-gathered and merged
  into the global top-K. The remaining mass is a float64 sum over each shard's *non-K* entries,
  all-reduced, then taken to log space — never `1 − Σp`, which cancels when the K ids hold nearly all
  of the mass; the normaliser is that rest plus the K entries' mass (one MAX and one SUM all-reduce).
- `sampled_targets`: N draws with replacement from softmax(z/T), by inverse CDF in global id order.
  The probabilities become integer weights `⌊2^s · 2^(q/2^16)⌉`, q the exponent `(z−max)·log2 e`
  rounded to 2^-16, with `V·2^(s+1) ≤ 2^53`, so every prefix sum is exact whatever the split; the
  caller's uniforms pick `⌊u·W⌋` in `[0, W)`, and the rank whose weight interval holds a draw resolves
  it by binary search over its local cumulative weights (choose the shard by its mass, then the id
  within it). The weights come from a multiply, a rounding, a 2^16-entry table and integer shifts,
  never from torch's `exp`, whose vectorised and scalar paths may differ in the last bit (and the
  split decides which path an entry meets): the same logits give the same draws at every TP size.
  The costs: a probability is moved by at most a factor (1 ± 5·10^-6) by the exponent's rounding, and
  entries below `2^-(s+1)` of the top (s ≥ 20 for any V ≤ 2^32) are never drawn.

Rows are processed in chunks so the float64 temporaries stay near `chunk_bytes`; every function takes
its process group explicitly and gives identical results on every rank of it.
"""
from __future__ import annotations

import decimal
import functools

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.losses.shard import Shard, all_reduce, group_size, row_max

CHUNK_BYTES = 4 << 20
_LOG2E = 1.4426950408889634


def _rows_per_chunk(n: int, width: int, chunk_bytes: int) -> int:
    return max(1, min(n, chunk_bytes // max(1, 8 * width)))


def _all_gather(tensor: Tensor, group) -> Tensor:
    """[tp, ...]: every rank's `tensor` stacked in rank order (just `tensor[None]` without a group)."""
    if group_size(group) == 1:
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(group_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def topk_targets(logits: Tensor, *, k: int, temperature: float = 1.0, vocab_size: int | None = None,
                 group=None, chunk_bytes: int = CHUNK_BYTES) -> tuple[Tensor, Tensor, Tensor]:
    """Global top-K of softmax(logits/T) over the full vocabulary, from this rank's slice [N, Vl].

    Returns ids [N, K] int64 ascending per row, their full-vocabulary log-probs [N, K] float32 and the
    log of the remaining mass [N] float32 (−inf when the K ids hold all of it).
    """
    shard = Shard.of(logits.shape[-1], vocab_size, group)
    if not 0 < k <= shard.vocab_size:
        raise ValueError(f"k: expected 1 ≤ k ≤ vocab_size={shard.vocab_size}, got {k}")
    rows = _rows_per_chunk(logits.shape[0], shard.local_size, chunk_bytes)
    parts = [_topk_chunk(logits[i: i + rows], k, temperature, shard) for i in range(0, logits.shape[0], rows)]
    return tuple(torch.cat(p) for p in zip(*parts)) if parts else _empty_topk(k)


def _empty_topk(k: int) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty(0, k, dtype=torch.int64), torch.empty(0, k), torch.empty(0)


def _topk_chunk(logits: Tensor, k: int, temperature: float, shard: Shard) -> tuple[Tensor, Tensor, Tensor]:
    z = logits[:, : shard.width].float()
    z = z / temperature if temperature != 1.0 else z
    top = all_reduce(row_max(z), "max", shard.group)
    cand_z, cand_ids = _local_candidates(z, k, shard)
    cand_z, cand_ids = (_all_gather(t, shard.group) for t in (cand_z, cand_ids))
    merged_z = cand_z.permute(1, 0, 2).reshape(z.shape[0], -1)
    merged_ids = cand_ids.permute(1, 0, 2).reshape(z.shape[0], -1)
    best_z, slot = merged_z.topk(k, dim=-1)
    ids = merged_ids.gather(-1, slot)
    exp = (z - top.unsqueeze(-1)).exp_()
    owned = (ids >= shard.start) & (ids < shard.start + shard.width)
    rows, cols = owned.nonzero(as_tuple=True)
    exp[rows, ids[rows, cols] - shard.start] = 0.0
    rest = all_reduce(exp.sum(dim=-1, dtype=torch.float64), "sum", shard.group)
    shifted = best_z.double() - top.double().unsqueeze(-1)  # [C, K], identical on every rank
    log_total = (rest + shifted.exp().sum(dim=-1)).log()  # two positive sums: no cancellation
    logprobs = (shifted - log_total.unsqueeze(-1)).float()
    log_rest = (rest.log() - log_total).float()
    order = ids.argsort(dim=-1)
    return ids.gather(-1, order), logprobs.gather(-1, order), log_rest


def _local_candidates(z: Tensor, k: int, shard: Shard) -> tuple[Tensor, Tensor]:
    """This rank's top-min(K, width) values and global ids, padded to K with (−inf, −1)."""
    local = min(k, shard.width)
    values, index = z.topk(local, dim=-1) if local else (z[:, :0], z[:, :0].long())
    pad = k - local
    if pad:
        values = torch.cat([values, values.new_full((z.shape[0], pad), float("-inf"))], dim=-1)
        index = torch.cat([index, index.new_full((z.shape[0], pad), -1 - shard.start)], dim=-1)
    return values.contiguous(), (index + shard.start).contiguous()


def weight_bits(vocab_size: int) -> int:
    """s such that V·2^(s+1) ≤ 2^53: every weight is below 2^(s+1), so every partial sum of the integer
    weights, and their total times a uniform, is exact in float64 too."""
    return 52 - max(1, (vocab_size - 1).bit_length())


@functools.lru_cache(maxsize=8)
def _fraction_table(bits: int) -> Tensor:
    """⌊2^bits · 2^(j/2^16)⌉ for j in [0, 2^16), from exact integer arithmetic (the same on every machine):
    2^(j/2^16) = 2^(a/2^8) · 2^(b/2^16) with j = 2^8·a + b, each factor a correctly rounded Decimal."""
    with decimal.localcontext() as context:
        context.prec = 40
        two = decimal.Decimal(2)
        scale = 1 << 100
        coarse = [int((two ** (decimal.Decimal(a) / 256)) * scale) for a in range(256)]
        fine = [int((two ** (decimal.Decimal(b) / 65536)) * scale) for b in range(256)]
    table = [(coarse[j >> 8] * fine[j & 255] + (1 << (199 - bits))) >> (200 - bits) for j in range(1 << 16)]
    return torch.tensor(table, dtype=torch.int64)


def integer_weights(shifted: Tensor, bits: int) -> Tensor:
    """⌊2^bits · 2^(q/2^16)⌉ as int64, with q = round(shifted · log2 e · 2^16), for float32 `shifted` ≤ 0.

    Only an IEEE multiply, a rounding, integer shifts and a table lookup are used, so the result does not
    depend on which kernel (vectorised or scalar tail) meets an entry. Rounding the exponent to 2^-16
    changes each probability by at most a factor 2^(2^-17) (1 + 5·10^-6). Entries below 2^-(bits+1) of
    the top weigh 0.
    """
    q = (shifted * (_LOG2E * 65536.0)).round_().clamp_(min=-((bits + 2) << 16)).to(torch.int32)
    table = _fraction_table(bits).to(shifted.device)
    weights = table[(q & 0xFFFF).long()]
    return weights >> (-(q >> 16)).long()


def sampled_targets(logits: Tensor, uniforms: Tensor, *, temperature: float = 1.0, vocab_size: int | None = None,
                    group=None, chunk_bytes: int = CHUNK_BYTES) -> tuple[Tensor, Tensor]:
    """N draws per row from softmax(logits/T) over the full vocabulary, from this rank's slice [N, Vl].

    `uniforms` [N, D] float64 in [0, 1), identical on every TP rank (seeded by the sample's key),
    decides the D draws. Returns (ids [N, D], counts [N, D]) int64: each row's distinct drawn ids
    ascending, then −1 with count 0.
    """
    shard = Shard.of(logits.shape[-1], vocab_size, group)
    if uniforms.dtype != torch.float64 or uniforms.shape[0] != logits.shape[0]:
        raise ValueError(f"uniforms: expected float64 [{logits.shape[0]}, D], got {uniforms.dtype} {tuple(uniforms.shape)}")
    rows = _rows_per_chunk(logits.shape[0], 2 * shard.local_size, chunk_bytes)
    draws = [_draw_chunk(logits[i: i + rows], uniforms[i: i + rows], temperature, shard)
             for i in range(0, logits.shape[0], rows)]
    drawn = torch.cat(draws) if draws else uniforms.new_empty(uniforms.shape, dtype=torch.int64)
    return unique_counts(drawn)


def _draw_chunk(logits: Tensor, uniforms: Tensor, temperature: float, shard: Shard) -> Tensor:
    """[C, D] global ids drawn for rows `logits` [C, Vl], identical on every rank of the group."""
    z = logits[:, : shard.width].float()
    z = z / temperature if temperature != 1.0 else z
    top = all_reduce(row_max(z), "max", shard.group)
    weights = integer_weights(z - top.unsqueeze(-1), weight_bits(shard.vocab_size))
    cumulative = weights.cumsum(dim=-1)
    local_total = cumulative[:, -1] if shard.width else weights.new_zeros(z.shape[0])
    totals = _all_gather(local_total, shard.group)  # [tp, C]
    before = totals.cumsum(dim=0)[_rank(shard.group)] - local_total
    picks = (uniforms * totals.sum(dim=0).double().unsqueeze(-1)).floor().long()
    local = picks - before.unsqueeze(-1)
    mine = (local >= 0) & (local < local_total.unsqueeze(-1))
    found = torch.searchsorted(cumulative, local.clamp(min=0), right=True) if shard.width else local
    ids = torch.where(mine, found + shard.start, torch.full_like(local, -1))
    return all_reduce(ids, "max", shard.group)


def _rank(group) -> int:
    return dist.get_rank(group) if group_size(group) > 1 else 0


def unique_counts(drawn: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct values of each row of `drawn` [N, D] ascending with their counts; −1 / 0 after them."""
    ordered = drawn.sort(dim=-1).values
    fresh = torch.ones_like(ordered, dtype=torch.bool)
    fresh[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = fresh.long().cumsum(dim=-1) - 1
    ids = torch.full_like(ordered, -1).scatter_(-1, slot, ordered)
    counts = torch.zeros_like(ordered).scatter_add_(-1, slot, torch.ones_like(ordered))
    return ids, counts

"""What the teacher does on the calibration tokens: activation magnitudes, the cost of skipping each layer, its loss.

One pass of the teacher (our megatron-core `LlamaGPT`, at any TP) over the first N samples, with forward hooks
that sum, over every position whose next token is real (`label_mask`):
  - MLP channels: |silu(gate)·up| per channel, the input of each layer's `linear_fc2` (down_proj);
  - attention heads: the L2 norm of each query head's attention output, the input of `linear_proj` (o_proj);
  - hidden channels: |x| per channel of the residual stream entering every layer and the final norm;
and the teacher's next-token cross-entropy. Means are sums / positions, accumulated in float64.

Tensor parallelism: every TP rank runs the same samples. A rank sees only its slice of the MLP channels and
heads (megatron's fc1 gives rank r the contiguous block r of the intermediate channels, its own gate and up
halves; its attention holds query heads [r·n/tp, (r+1)·n/tp), whole kv groups when tp ≤ kv heads), so those
sums are all-gathered over the TP group in rank order into the full vectors, the same on every rank; the
residual stream is replicated, so the hidden-channel sums are already full. Logits are vocab-parallel: the
log-softmax, the KL and the cross-entropy are taken from each rank's vocabulary slice with a max/sum
all-reduce of the log-partition and a sum all-reduce of the per-position terms, never gathering the
vocabulary. Results equal TP 1's up to float rounding (sums in another order).

Layer importance (`--depth importance`): for each layer i the teacher runs again with layer i replaced by
the identity (a forward hook returns the layer's input), and the score is the mean over positions of
KL(p_full ‖ p_without_i) of the next-token distributions; the layers with the smallest scores go.
Design choice: KL of the output distribution measures what distillation will have to recover, unlike a
cosine of hidden states; the cost is one extra teacher forward per layer per batch (L + 1 in all).

Samples are computed as whole sequences (no document masking), as `transformers` would run them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.losses.shard import all_reduce
from pipeline.prune.errors import PruneError


@dataclass
class Calibration:
    """Mean statistics over `positions` calibration positions; per teacher layer where a list."""

    positions: int
    mlp: list[Tensor]            # [intermediate_size] mean |silu(gate)·up|
    heads: list[Tensor]          # [num_heads] mean ‖attention output of the head‖
    hidden: Tensor               # [hidden_size] mean |residual| over layer inputs and the final norm's input
    layer_kl: Optional[Tensor]   # [num_layers] mean KL(full ‖ layer skipped), None unless asked for
    loss: float                  # the teacher's mean next-token cross-entropy (nats)


def calibration_samples(location: str, count: int) -> tuple[Tensor, Tensor]:
    """Tokens `[N, S+1]` int64 of the first `count` samples of a token-shard folder (manifest order), and the
    bool `[N, S]` mask of positions whose next token is real."""
    from pipeline.data.dataset import label_mask
    from pipeline.data.shards import ShardReader
    from pipeline.data.sources import ShardSet
    from tokenization.format import decode_sample

    shards = ShardSet(location)
    manifest = shards.manifest
    total = sum(entry.samples for entry in manifest.shards)
    if not 1 <= count <= total:
        raise PruneError(f"--samples {count}: expected 1 ≤ N ≤ {total}, the samples in {location}")
    rows, ends = [], []
    for shard, entry in enumerate(manifest.shards):
        if len(rows) >= count:
            break
        reader = ShardReader(shards.url(shard), expected=entry.samples, where=shards.where(shard))
        try:
            for raw in reader.take(min(entry.samples, count - len(rows))):
                tokens, segments = decode_sample(raw, seq_len=manifest.seq_len, dtype=manifest.dtype,
                                                 where=shards.where(shard))
                rows.append(tokens.astype(np.int64))
                ends.append(int(segments[-1]))
        finally:
            reader.close()
    tokens = torch.from_numpy(np.stack(rows))
    return tokens, label_mask(torch.tensor(ends)[:, None], manifest.seq_len)


@dataclass(frozen=True)
class VocabSlice:
    """This TP rank's real vocabulary columns: global ids [start, start + width), over `group`."""

    group: object
    start: int
    width: int

    @classmethod
    def of(cls, model, ctx) -> "VocabSlice":
        start, end = ctx.vocab_range(model.padded_vocab)
        return cls(ctx.tp_group, start, max(0, min(end, model.model_config.vocab_size) - start))

    def sum(self, tensor: Tensor) -> Tensor:
        return all_reduce(tensor, "sum", self.group)


def _log_probs(model, tokens: Tensor, vocab: VocabSlice) -> Tensor:
    """log p of this rank's real vocabulary columns `[B, S, width]` under the full next-token distribution."""
    local = model(tokens)[..., :vocab.width].float()
    lse = torch.logsumexp(local, dim=-1)  # -inf on a rank whose slice is all padding
    top = all_reduce(lse.clone(), "max", vocab.group)
    total = vocab.sum((lse - top).exp())
    return local - (top + total.log())[..., None]


def _kl_terms(full: Tensor, without: Tensor, vocab: VocabSlice) -> Tensor:
    """KL(full ‖ without) per position `[B, S]`, summed over the whole vocabulary."""
    return vocab.sum((full.exp() * (full - without)).sum(-1))


class _Sums:
    """Forward hooks summing |activations| over the masked positions of the current batch."""

    def __init__(self, model, tp: int):
        cfg = model.model_config
        layers, device = model.decoder.layers, model.embedding.word_embeddings.weight.device
        self.mlp = [torch.zeros(cfg.intermediate_size // tp, dtype=torch.float64, device=device) for _ in layers]
        self.heads = [torch.zeros(cfg.num_heads // tp, dtype=torch.float64, device=device) for _ in layers]
        self.hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64, device=device)
        self.model, self.head_size, self.mask = model, cfg.head_size, None

    def _weighted(self, act: Tensor) -> Tensor:
        """Sum over positions of `act` [S, B, C] where the mask [S, B] is set, in float64: [C]."""
        return (act.double() * self.mask[..., None]).sum(dim=(0, 1))

    def _add(self, total: Tensor, act: Tensor) -> None:
        total.add_(self._weighted(act))  # a hook that returned a tensor would replace the module's input

    @contextlib.contextmanager
    def hooked(self, mask: Tensor):
        self.mask = mask.t().double()  # megatron activations are [S, B, ...]
        handles = []
        for i, layer in enumerate(self.model.decoder.layers):
            handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(
                lambda mod, args, i=i: self._add(self.mlp[i], args[0].abs())))
            handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(
                lambda mod, args, i=i: self._add(self.heads[i], args[0].unflatten(-1, (-1, self.head_size))
                                                 .norm(dim=-1))))
            handles.append(layer.register_forward_pre_hook(
                lambda mod, args, kwargs: self._add(self.hidden, kwargs["hidden_states"].abs()), with_kwargs=True))
        handles.append(self.model.decoder.final_layernorm.register_forward_pre_hook(
            lambda mod, args: self._add(self.hidden, args[0].abs())))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def skipped(layer):
    """`layer` computes the identity while inside (megatron's TransformerLayer returns (hidden, context))."""
    handle = layer.register_forward_hook(lambda mod, args, kwargs, out: (kwargs["hidden_states"], out[1]),
                                         with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _cross_entropy_sum(log_probs: Tensor, tokens: Tensor, mask: Tensor, vocab: VocabSlice) -> float:
    """Minus the summed log-probability of the next tokens: each from the rank whose slice holds it."""
    local = tokens[:, 1:] - vocab.start
    owned = (local >= 0) & (local < vocab.width)
    picked = log_probs.gather(-1, local.clamp(0, max(vocab.width - 1, 0))[..., None]).squeeze(-1)
    picked = vocab.sum(torch.where(owned, picked, torch.zeros_like(picked)))
    return float(-(picked.double() * mask).sum())


def _gathered(local: Tensor, group) -> Tensor:
    """The TP ranks' slices of a statistic, concatenated in rank order (the full vector on every rank)."""
    if group is None or dist.get_world_size(group) == 1:
        return local.cpu()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts).cpu()


@torch.no_grad()
def calibrate(model, tokens: Tensor, mask: Tensor, ctx, *, batch_size: int, layer_importance: bool,
              progress: bool = False) -> Calibration:
    """The statistics of `model` (a LlamaGPT in eval mode, this rank's TP slices) over `tokens` [N, S+1] at the
    `mask` positions; collective over `ctx`'s TP group, the same result on every rank."""
    from tqdm import tqdm

    device, vocab = model.embedding.word_embeddings.weight.device, VocabSlice.of(model, ctx)
    sums, layers = _Sums(model, ctx.tp_size), model.decoder.layers
    kl = torch.zeros(len(layers), dtype=torch.float64) if layer_importance else None
    loss, positions = 0.0, int(mask.sum())
    starts = range(0, len(tokens), batch_size)
    for start in tqdm(starts, desc="calibration", unit="batch", disable=not progress):
        batch, where = tokens[start:start + batch_size].to(device), mask[start:start + batch_size].to(device)
        with sums.hooked(where):
            full = _log_probs(model, batch[:, :-1], vocab)
        loss += _cross_entropy_sum(full, batch, where, vocab)
        for i in range(len(layers)) if layer_importance else ():
            with skipped(layers[i]):
                without = _log_probs(model, batch[:, :-1], vocab)
            kl[i] += float((_kl_terms(full, without, vocab).double() * where).sum())
    count = max(positions, 1)
    return Calibration(positions=positions, mlp=[_gathered(s, ctx.tp_group) / count for s in sums.mlp],
                       heads=[_gathered(s, ctx.tp_group) / count for s in sums.heads],
                       hidden=sums.hidden.cpu() / (count * (len(layers) + 1)),
                       layer_kl=None if kl is None else kl / count, loss=loss / count)


@torch.no_grad()
def mean_loss(model, tokens: Tensor, mask: Tensor, ctx, *, batch_size: int) -> float:
    """The mean next-token cross-entropy of `model` over the `mask` positions of `tokens` (collective over
    `ctx`'s TP group)."""
    device, vocab = model.embedding.word_embeddings.weight.device, VocabSlice.of(model, ctx)
    total = 0.0
    for start in range(0, len(tokens), batch_size):
        batch, where = tokens[start:start + batch_size].to(device), mask[start:start + batch_size].to(device)
        total += _cross_entropy_sum(_log_probs(model, batch[:, :-1], vocab), batch, where, vocab)
    return total / max(int(mask.sum()), 1)

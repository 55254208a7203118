"""The key/value cache of incremental decoding, plugged into the model's own attention modules.

Decoding runs the model's ordinary forward (megatron-core's layers: the fused QKV projection, our
rotary embedding, the row-parallel output projection with its all-reduce, the MLP) on the new tokens
only. What changes is the core attention: while a `KVCache` is attached, each layer's `CoreAttention`
hands its keys and values to `LayerCache.attend`, which writes them into preallocated buffers
`[B, kv_heads/tp, slots, D]` and attends the new queries over every filled slot. Rows are left-padded
(a batch of prompts of different lengths ends on the same slot), so the slot of the next token is one
number for the whole batch; `valid` marks which slots hold a real token, and a query attends the valid
slots at or before its own (within the sliding window, if any). A padding query attends only itself, so
no row of the attention is empty (an empty row would be NaN, and NaN keys leak through a zero weight).

Design choice: the cache lives outside the model and is attached for the duration of a call, so
training, the teacher cache job and generation share one set of modules and one numerics path, and
the model holds no generation state between calls. The costs: buffers are sized for the longest row
up front (`B × slots × 2 × layers × kv_heads/tp × D` values), and decode always uses torch's SDPA,
also where training uses flash-attn (a decode query is one token, where SDPA loses little).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class KVCache:
    """Keys and values of every layer for `batch` rows of up to `slots` tokens; see the module docstring."""

    def __init__(self, model, batch: int, slots: int):
        weight = model.embedding.word_embeddings.weight
        attention = [layer.self_attention for layer in model.decoder.layers]
        first = attention[0]
        kv_heads = first.num_query_groups_per_partition
        head_dim = first.hidden_size_per_attention_head
        shape = (batch, kv_heads, slots, head_dim)
        self.layers = [LayerCache(self, torch.empty(shape, dtype=weight.dtype, device=weight.device),
                                  torch.empty(shape, dtype=weight.dtype, device=weight.device))
                       for _ in attention]
        self.core = [a.core_attention for a in attention]
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=weight.device)
        self.length = 0          # slots filled before the current forward
        self.incoming = 0        # slots the current forward adds
        self.mask: Optional[Tensor] = None

    @property
    def slots(self) -> int:
        return self.valid.shape[1]

    def begin(self, valid: Tensor) -> None:
        """Prepare a forward over `valid.shape[1]` new slots (`valid` [B, S_new]: which hold real tokens)."""
        new = valid.shape[1]
        if self.length + new > self.slots:
            raise ValueError(f"KV cache holds {self.slots} slots; {self.length} are filled and {new} more were asked")
        self.valid[:, self.length: self.length + new] = valid
        self.incoming = new
        self.mask = None

    def attention_mask(self, window: Optional[int]) -> Tensor:
        """Bool [B, 1, S_new, S_total]: query slot i attends key slot j."""
        total = self.length + self.incoming
        device = self.valid.device
        query = torch.arange(self.length, total, device=device)[:, None]
        key = torch.arange(total, device=device)[None, :]
        allowed = key <= query
        if window is not None:
            allowed = allowed & (query - key < window)
        allowed = allowed[None] & self.valid[:, None, :total]
        return (allowed | (key == query)[None])[:, None]

    def finish(self) -> None:
        """The current forward is done: its slots are part of the cache."""
        self.length += self.incoming
        self.incoming = 0
        self.mask = None

    def keep(self, rows: Tensor) -> None:
        """Drop every row but `rows` (int64 indices), e.g. the rows still generating."""
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        self.valid = self.valid[rows]
        self.mask = None

    @contextlib.contextmanager
    def attached(self):
        """Within the block, the model's core attention modules read and extend this cache."""
        for core, layer in zip(self.core, self.layers):
            core.kv_cache = layer
        try:
            yield self
        finally:
            for core in self.core:
                core.kv_cache = None


class LayerCache:
    """One layer's buffers; `attend` is what `CoreAttention.forward` calls while the cache is attached."""

    def __init__(self, owner: KVCache, keys: Tensor, values: Tensor):
        self.owner, self.keys, self.values = owner, keys, values

    def attend(self, query: Tensor, key: Tensor, value: Tensor, scale: float, window: Optional[int]) -> Tensor:
        """`[S_new, B, heads, D]` queries over the cached and new keys; returns `[S_new, B, heads·D]`."""
        owner = self.owner
        start, stop = owner.length, owner.length + owner.incoming
        if key.shape[0] != owner.incoming:
            raise ValueError(f"KV cache expected {owner.incoming} new positions, the layer has {key.shape[0]}")
        self.keys[:, :, start:stop] = key.permute(1, 2, 0, 3)
        self.values[:, :, start:stop] = value.permute(1, 2, 0, 3)
        if owner.mask is None:
            owner.mask = owner.attention_mask(window)
        q = query.permute(1, 2, 0, 3)                                                             # [B, h, S, D]
        k, v = self.keys[:, :, :stop], self.values[:, :, :stop]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=owner.mask, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)

"""The core attention of the Llama-family model: flash-attn on CUDA, torch SDPA everywhere else.

This module is what megatron-core's `SelfAttention` calls after the QKV projection and the rotary
embedding (its `core_attention` slot): `[S, B, heads, D]` queries, `[S, B, kv_heads, D]` keys and
values of this TP rank in, `[S, B, heads·D]` out. It is causal, grouped-query (key/value heads shared
by `heads / kv_heads` consecutive query heads, the Hugging Face convention), optionally sliding-window
(Mistral), and optionally blocked at document boundaries inside a packed sample. While a generation
KV cache is attached (`pipeline/generate/kv_cache.py`), the new keys and values go to the cache and the
queries attend over all of it there.

Document boundaries travel through megatron's `attention_mask` argument as document ids `[B, S]`
(int, equal within a document); megatron passes that tensor through untouched. SDPA turns them into
a boolean mask per layer (`B·S²` bytes, small next to the attention itself); flash-attn turns them
into variable-length sequences and never builds a mask. Without documents and without a window, SDPA
runs with `is_causal`, which lets torch pick its fused kernels.

Design choice: one module with two kernels behind the same contract, chosen once at build time, so a
config switches CPU development to CUDA production without another code path in the model. The cost:
flash-attn's numerics differ from SDPA's within bf16 tolerance, not bit for bit.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from megatron.core.transformer.module import MegatronModule

from pipeline.config import ConfigError

Backend = Literal["sdpa", "flash"]


def flash_attn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether flash-attn can run here: installed, on CUDA, with a half-precision dtype."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and importlib.util.find_spec("flash_attn") is not None)


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The kernel for `compute.attention`; a ConfigError saying why when flash is asked for but cannot run."""
    if requested == "sdpa":
        return "sdpa"
    usable = flash_attn_usable(device, dtype)
    if requested == "flash" and not usable:
        raise ConfigError("compute.attention", f"flash needs CUDA, bfloat16/float16 and the flash-attn package "
                         f"(pip install '.[gpu]'); this job has device={device.type}, dtype={dtype}, "
                         f"flash_attn {'installed' if importlib.util.find_spec('flash_attn') else 'not installed'}")
    return "flash" if usable else "sdpa"


def allowed_pairs(document_ids: Optional[Tensor], seq_len: int, window: Optional[int], device) -> Tensor:
    """Boolean `[B|1, 1, S, S]`: query i may attend key j (causal, same document, within the window)."""
    query = torch.arange(seq_len, device=device)[:, None]
    key = torch.arange(seq_len, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed = allowed & (query - key < window)
    allowed = allowed[None, None]
    if document_ids is not None:
        same_doc = document_ids[:, :, None] == document_ids[:, None, :]                      # [B, S, S]
        allowed = allowed & same_doc[:, None]
    return allowed


def document_starts(document_ids: Tensor) -> Tensor:
    """Boolean `[B, S]`: the position opens a document (the row's first, or its id differs from the previous)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def _varlen_boundaries(document_ids: Tensor) -> tuple[Tensor, int]:
    """Cumulative sequence starts (int32) and the longest document, over the flattened batch."""
    batch, seq_len = document_ids.shape
    offsets = torch.nonzero(document_starts(document_ids).flatten()).flatten()
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([batch * seq_len])]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


class CoreAttention(MegatronModule):
    """megatron-core `core_attention` module running SDPA or flash-attn; see the module docstring."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None, *, backend: Backend = "sdpa",
                 sliding_window: Optional[int] = None):
        super().__init__(config=config)
        self.backend = backend
        self.sliding_window = sliding_window
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.kv_cache = None  # a pipeline.generate.kv_cache.LayerCache while a decoder has its cache attached

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("CoreAttention takes neither attention_bias nor packed_seq_params")
        if self.kv_cache is not None:
            return self.kv_cache.attend(query, key, value, self.scale, self.sliding_window)
        seq_len, batch = query.shape[:2]
        dropout = self.dropout if self.training else 0.0
        if self.backend == "flash":
            out = self._flash(query, key, value, attention_mask, dropout)
        else:
            out = self._sdpa(query, key, value, attention_mask, dropout)
        return out.reshape(seq_len, batch, -1)

    def _sdpa(self, query, key, value, document_ids, dropout) -> Tensor:
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))                          # [B, h, S, D]
        gqa = q.shape[1] != k.shape[1]
        if document_ids is None and self.sliding_window is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=self.scale,
                                                 enable_gqa=gqa)
        else:
            mask = allowed_pairs(document_ids, q.shape[2], self.sliding_window, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale,
                                                 enable_gqa=gqa)
        return out.permute(2, 0, 1, 3)                                                           # [S, B, h, D]

    def _flash(self, query, key, value, document_ids, dropout) -> Tensor:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        window = (-1, -1) if self.sliding_window is None else (self.sliding_window - 1, 0)
        q, k, v = (t.transpose(0, 1).contiguous() for t in (query, key, value))                  # [B, S, h, D]
        if document_ids is None:
            out = flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=self.scale, causal=True,
                                  window_size=window)
            return out.transpose(0, 1)
        batch, seq_len = document_ids.shape
        cu_seqlens, longest = _varlen_boundaries(document_ids)
        flat = [t.reshape(batch * seq_len, *t.shape[2:]) for t in (q, k, v)]
        out = flash_attn_varlen_func(*flat, cu_seqlens, cu_seqlens, longest, longest, dropout_p=dropout,
                                     softmax_scale=self.scale, causal=True, window_size=window)
        return out.reshape(batch, seq_len, *out.shape[1:]).transpose(0, 1)

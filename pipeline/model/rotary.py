"""Rotary position embeddings for megatron-core's attention, on any device and with per-sample positions.

megatron-core's own `RotaryEmbedding` moves its frequencies to `torch.cuda.current_device()` on the
first forward, so it cannot run on CPU, and it only knows positions 0..S-1 shared by the whole batch.
This module replaces it inside `GPTModel` (same call signature, same `[S, B|1, 1, D]` output that
megatron's `apply_rotary_pos_emb` consumes), computes the inverse frequencies exactly as Hugging Face
does (float32, Llama-3 smooth scaling or linear scaling), and takes optional per-sample positions so
that packed documents can restart at position 0.

Design choice: positions are handed over by `set_positions` just before the model's forward rather
than threaded through megatron's call chain, which has no slot for them; the cost is that the module
holds per-forward state, cleared by the model after each forward.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> Tensor:
    """[D/2] float32 rotary inverse frequencies of `cfg`, with its rope scaling applied."""
    dim = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling == "llama3":
        return _llama3_scaled(inv_freq, cfg)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    return inv_freq


def _llama3_scaled(inv_freq: Tensor, cfg: ModelConfig) -> Tensor:
    """Llama 3.1 scaling: long wavelengths divided by the factor, short ones kept, a smooth blend between."""
    low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Drop-in for megatron-core's `RotaryEmbedding` in `GPTModel`: returns angles `[S, B|1, 1, D]`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(cfg), persistent=False)
        self._positions: Tensor | None = None

    def set_positions(self, positions: Tensor | None) -> None:
        """Positions `[B, S]` for the next forward (None: 0..S-1 for every sample)."""
        self._positions = positions

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> Tensor:
        if packed_seq:
            raise NotImplementedError("packed (thd) sequences are not used by this pipeline")
        inv_freq = self.inv_freq.float()
        if self._positions is None:
            positions = torch.arange(offset, offset + max_seq_len, device=inv_freq.device)[:, None]   # [S, 1]
        else:
            positions = self._positions.t().to(inv_freq.device)                                      # [S, B]
        angles = positions.float()[..., None] * inv_freq                                             # [S, B, D/2]
        return torch.cat((angles, angles), dim=-1)[:, :, None, :]                                    # [S, B, 1, D]

    def get_rotary_seq_len(self, inference_context, transformer, transformer_input, transformer_config,
                           packed_seq_params) -> int:
        """The sequence length megatron asks rotary angles for: the decoder input's (its dim 0)."""
        return transformer_input.size(0)

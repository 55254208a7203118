"""Random initialisation of a new model that is the same at every TP size and on every device.

megatron-core draws each weight from the global random stream in construction order, after the
padded embedding, whose size depends on TP; on CUDA it also seeds each TP rank differently. So a
student built at TP=1 and at TP=2 would start from different weights and their runs could not be
compared. Here every Hugging Face-layout tensor is drawn from its own generator, seeded by
(seed, tensor name), and each rank keeps its slice through the same mapping the import uses.

The scheme is megatron's: normal(0, std) for embeddings and input projections, normal(0,
std/√(2·layers)) for the two output projections of each layer (o_proj, down_proj), ones for norms,
zeros for biases; padded vocabulary rows are zero.

Design choice: a full tensor per weight is drawn on the CPU on every rank, which costs the time and
memory of one full weight at a time; fine for students, never done for an imported teacher.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

from pipeline.config import ModelConfig
from pipeline.model.layout import Reader, fill_from_reader, hf_shapes


def _std_of(name: str, cfg: ModelConfig) -> float:
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
    return cfg.init_std


def initial_tensor(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> Tensor:
    """The float32 initial value of HF tensor `name`, a pure function of (seed, name, config)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(shape, generator=generator) * _std_of(name, cfg)


def initial_reader(cfg: ModelConfig, seed: int) -> Reader:
    """A layout.Reader over the initial tensors, drawing each one once, when first read."""
    shapes = hf_shapes(cfg)
    drawn: dict[str, Tensor] = {}

    def read(name: str, dim, start: int, end: int) -> Tensor:
        if name not in drawn:
            if len(drawn) >= 3:  # a rule reads at most 3 tensors (q, k, v) together; keep only those
                drawn.clear()
            drawn[name] = initial_tensor(name, shapes[name], cfg, seed)
        tensor = drawn[name]
        return tensor if dim is None else tensor.narrow(dim, start, end - start)

    return read


def initialize(model, seed: int, tp: int, rank: int) -> None:
    """Fill a LlamaGPT built without initialisation with the TP-invariant initial weights of `seed`."""
    fill_from_reader(model, initial_reader(model.model_config, seed), tp, rank)

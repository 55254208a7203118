"""The pruned architecture from the command-line targets, checked against the teacher before any weight is read.

Width keeps the teacher's head_dim (as Minitron does): heads are removed, never narrowed, so the pruned
hidden_size is independent of head_dim (the written config.json carries head_dim explicitly); it must still be
a multiple of the kept query heads, which the installed transformers checks even when head_dim is given. Query heads
go by whole key/value groups, so `--num-heads` must be a multiple of the teacher's query heads per kv head
and the kv heads shrink in proportion.

`--params N` rule (documented in docs/prune.md): explicit `--hidden-size`/`--num-heads` apply first;
then depth shrinks one layer at a time, down to half the teacher's layers (rounded up), until the count is
at most N; if that is not enough the MLP width takes the rest: the largest intermediate_size that fits.
A target the rule cannot reach is an error. Design choice: a fixed, explainable order (depth, then MLP)
rather than a search; the cost is that it never trades heads or hidden width for a parameter count.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from pipeline.config import ModelConfig
from pipeline.prune.errors import PruneError


def parameter_count(cfg: ModelConfig) -> int:
    """Parameters of a Llama-family model of `cfg` (embeddings, lm_head unless tied, norms, attention, MLP)."""
    H, D, F = cfg.hidden_size, cfg.head_size, cfg.intermediate_size
    qkv_rows = (cfg.num_heads + 2 * cfg.kv_heads) * D
    layer = 2 * H + qkv_rows * H + cfg.num_heads * D * H + 3 * H * F + (qkv_rows if cfg.qkv_bias else 0)
    return cfg.vocab_size * H * (1 if cfg.tie_embeddings else 2) + H + cfg.num_layers * layer


def _bounded(flag: str, value: Optional[int], teacher: int, what: str) -> int:
    if value is None:
        return teacher
    if not 1 <= value <= teacher:
        raise PruneError(f"{flag} {value}: expected 1 ≤ {flag} ≤ {teacher}, the teacher's {what} (pruning only "
                         f"removes)")
    return value


def pruned_config(teacher: ModelConfig, *, num_layers: Optional[int] = None, hidden_size: Optional[int] = None,
                  intermediate_size: Optional[int] = None, num_heads: Optional[int] = None,
                  params: Optional[int] = None) -> ModelConfig:
    """The student's ModelConfig for these targets (None: keep the teacher's); PruneError naming the flag."""
    if params is not None and (num_layers is not None or intermediate_size is not None):
        raise PruneError("--params picks --num-layers and --intermediate-size itself; give either --params or "
                         "those two (--hidden-size and --num-heads combine with --params)")
    layers = _bounded("--num-layers", num_layers, teacher.num_layers, "layers")
    hidden = _bounded("--hidden-size", hidden_size, teacher.hidden_size, "hidden_size")
    ffn = _bounded("--intermediate-size", intermediate_size, teacher.intermediate_size, "intermediate_size")
    heads = _bounded("--num-heads", num_heads, teacher.num_heads, "query heads")
    per_group = teacher.num_heads // teacher.kv_heads
    if heads % per_group:
        raise PruneError(f"--num-heads {heads} would split a grouped-query group: the teacher has {per_group} query "
                         f"heads per key/value head ({teacher.num_heads} and {teacher.kv_heads}); use a multiple of "
                         f"{per_group}")
    if hidden % heads:
        raise PruneError(f"--hidden-size {hidden} is not a multiple of the {heads} query heads kept (--num-heads): "
                         f"transformers refuses such a config even with head_dim given")
    cfg = dataclasses.replace(teacher, num_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                              num_heads=heads, num_kv_heads=heads // per_group, head_dim=teacher.head_size)
    return cfg if params is None else _fit_params(cfg, params)


def _fit_params(cfg: ModelConfig, params: int) -> ModelConfig:
    """Shrink depth (to half, rounded up), then MLP width, until `parameter_count <= params`."""
    if params < 1:
        raise PruneError(f"--params {params}: expected a positive parameter count")
    floor = (cfg.num_layers + 1) // 2
    while parameter_count(cfg) > params and cfg.num_layers > floor:
        cfg = dataclasses.replace(cfg, num_layers=cfg.num_layers - 1)
    if parameter_count(cfg) <= params:
        return cfg
    without_mlp = parameter_count(cfg) - cfg.num_layers * 3 * cfg.hidden_size * cfg.intermediate_size
    ffn = (params - without_mlp) // (cfg.num_layers * 3 * cfg.hidden_size)
    if ffn < 1:
        smallest = without_mlp + cfg.num_layers * 3 * cfg.hidden_size
        raise PruneError(f"--params {params}: below what the rule reaches ({cfg.num_layers} layers, intermediate_size "
                         f"1: {smallest} parameters); also give a smaller --hidden-size or --num-heads")
    return dataclasses.replace(cfg, intermediate_size=min(ffn, cfg.intermediate_size))


def fixed_layers(teacher_layers: int, keep: int) -> list[int]:
    """Evenly spaced layers, floor(i·L/K) for i < K: every other layer (0, 2, 4, …) when K = L/2, all when K = L."""
    return [i * teacher_layers // keep for i in range(keep)]

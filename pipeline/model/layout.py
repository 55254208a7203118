"""Where every Hugging Face tensor goes in the megatron-core model, for any TP size, and back.

A Llama-family checkpoint and `LlamaGPT` hold the same numbers in different places: megatron fuses
q, k and v into one matrix grouped by key/value head (`q… k v` per group), fuses gate and up into one
matrix per TP rank (`[gate_r; up_r]`), splits projections' rows or columns over TP ranks and pads the
vocabulary. One `TensorRule` per megatron parameter says which HF tensors it comes from and how it
is split; `shard_from_hf` builds one rank's shard by reading only the slices that rank needs (the
reader may be lazy, see `checkpoint_files.py`), and `hf_from_shards` inverts it from every rank's shard.

Design choice: pure functions over (rule, config, tp, rank) with the reading injected, so import,
export, the offline converter and the tests share one mapping and none of them needs processes;
the cost is that the fused QKV shard is assembled head block by head block (one read per head).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from pipeline.config import ModelConfig
from pipeline.model.errors import CheckpointError, ModelLayoutError

Split = Literal["replicated", "columns", "qkv", "gated", "vocab"]
# read(hf_name, dim, start, end) -> the HF tensor's [start, end) slice along dim (whole tensor if dim is None)
Reader = Callable[[str, Optional[int], int, int], Tensor]


@dataclass(frozen=True)
class TensorRule:
    """One megatron parameter: its name, the HF tensors it is made of, and how TP splits it."""

    megatron: str
    hf: tuple[str, ...]
    split: Split


def check_tp(cfg: ModelConfig, tp: int, device_type: str = "cuda") -> None:
    """A ModelLayoutError naming the setting when `cfg` cannot be split over `tp` ranks on `device_type`.

    Fewer key/value heads than ranks works on CUDA only: megatron-core then all-gathers the fused
    QKV activations through a buffer it allocates on the current CUDA device.
    """
    problems = []
    if cfg.num_heads % tp:
        problems.append(f"num_heads={cfg.num_heads} is not divisible by tp={tp}")
    if cfg.kv_heads % tp and tp % cfg.kv_heads:
        problems.append(f"num_kv_heads={cfg.kv_heads} must be divisible by tp={tp} or divide it")
    elif cfg.kv_heads < tp and device_type != "cuda":
        problems.append(f"num_kv_heads={cfg.kv_heads} < tp={tp} needs CUDA (megatron-core gathers the shared "
                        f"key/value heads on the GPU); use tp <= {cfg.kv_heads} on {device_type}")
    elif (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_size % tp:
        problems.append(f"the fused QKV rows (num_heads + 2·num_kv_heads)·head_dim = "
                        f"{(cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_size} are not divisible by tp={tp}")
    if cfg.intermediate_size % tp:
        problems.append(f"intermediate_size={cfg.intermediate_size} is not divisible by tp={tp}")
    if problems:
        raise ModelLayoutError("model cannot be split over tensor-parallel ranks: " + "; ".join(problems))


def tensor_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Every parameter of `LlamaGPT(cfg)` in `named_parameters` order, with its HF source."""
    rules = [TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        attn = h + "self_attn."
        qkv = tuple(attn + f"{p}_proj.weight" for p in "qkv")
        rules += [TensorRule(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "replicated"),
                  TensorRule(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), "columns"),
                  TensorRule(m + "self_attention.linear_qkv.weight", qkv, "qkv")]
        if cfg.qkv_bias:
            rules.append(TensorRule(m + "self_attention.linear_qkv.bias",
                                    tuple(attn + f"{p}_proj.bias" for p in "qkv"), "qkv"))
        rules += [TensorRule(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "replicated"),
                  TensorRule(m + "mlp.linear_fc1.weight", (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                             "gated"),
                  TensorRule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "columns")]
    rules.append(TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), "replicated"))
    if not cfg.tie_embeddings:
        rules.append(TensorRule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return rules


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape every tensor of a Hugging Face checkpoint of `cfg` must have."""
    H, D, F_ = cfg.hidden_size, cfg.head_size, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    for i in range(cfg.num_layers):
        h = f"model.layers.{i}."
        shapes.update({h + "input_layernorm.weight": (H,), h + "post_attention_layernorm.weight": (H,),
                       h + "self_attn.q_proj.weight": (cfg.num_heads * D, H),
                       h + "self_attn.k_proj.weight": (cfg.kv_heads * D, H),
                       h + "self_attn.v_proj.weight": (cfg.kv_heads * D, H),
                       h + "self_attn.o_proj.weight": (H, cfg.num_heads * D),
                       h + "mlp.gate_proj.weight": (F_, H), h + "mlp.up_proj.weight": (F_, H),
                       h + "mlp.down_proj.weight": (H, F_)})
        if cfg.qkv_bias:
            shapes.update({h + "self_attn.q_proj.bias": (cfg.num_heads * D,),
                           h + "self_attn.k_proj.bias": (cfg.kv_heads * D,),
                           h + "self_attn.v_proj.bias": (cfg.kv_heads * D,)})
    return shapes


def _qkv_blocks(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The fused QKV head blocks in megatron's order: (source 0=q 1=k 2=v, head index in that source)."""
    per_group = cfg.num_heads // cfg.kv_heads
    blocks = []
    for group in range(cfg.kv_heads):
        blocks += [(0, group * per_group + j) for j in range(per_group)]
        blocks += [(1, group), (2, group)]
    return blocks


def shard_from_hf(rule: TensorRule, read: Reader, cfg: ModelConfig, tp: int, rank: int,
                  padded_vocab: int) -> Tensor:
    """TP rank `rank`'s shard of `rule`'s parameter, reading only the slices it needs."""
    if rule.split == "replicated":
        return read(rule.hf[0], None, 0, 0)
    if rule.split == "columns":
        cols = (cfg.num_heads * cfg.head_size if "linear_proj" in rule.megatron else cfg.intermediate_size) // tp
        return read(rule.hf[0], 1, rank * cols, (rank + 1) * cols)
    if rule.split == "gated":
        rows = cfg.intermediate_size // tp
        return torch.cat([read(name, 0, rank * rows, (rank + 1) * rows) for name in rule.hf])
    if rule.split == "vocab":
        return _vocab_shard(rule.hf[0], read, cfg, tp, rank, padded_vocab)
    return _qkv_shard(rule, read, cfg, tp, rank)


def _qkv_shard(rule: TensorRule, read: Reader, cfg: ModelConfig, tp: int, rank: int) -> Tensor:
    """Rows `[rank·R, (rank+1)·R)` of the fused QKV matrix, R = rows / tp, read head block by head block.

    With fewer key/value heads than ranks a cut may fall inside a head block (megatron all-gathers
    the fused activations and re-slices them), so each block contributes only its overlapping rows.
    """
    D = cfg.head_size
    per_rank = len(_qkv_blocks(cfg)) * D // tp
    start, end = rank * per_rank, (rank + 1) * per_rank
    pieces = []
    for index, (source, head) in enumerate(_qkv_blocks(cfg)):
        lo, hi = max(start, index * D), min(end, (index + 1) * D)
        if lo < hi:
            offset = head * D - index * D
            pieces.append(read(rule.hf[source], 0, lo + offset, hi + offset))
    return torch.cat(pieces)


def _vocab_shard(name: str, read: Reader, cfg: ModelConfig, tp: int, rank: int, padded_vocab: int) -> Tensor:
    rows = padded_vocab // tp
    start, end = rank * rows, (rank + 1) * rows
    real = read(name, 0, start, min(end, cfg.vocab_size)) if start < cfg.vocab_size else None
    width = cfg.hidden_size
    if real is None:
        return torch.zeros(rows, width)
    padding = real.new_zeros(rows - real.shape[0], width)
    return torch.cat([real, padding])


def hf_from_shards(rule: TensorRule, shards: list[Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """The HF tensors of `rule` from every TP rank's shard (rank order), vocabulary padding dropped."""
    if rule.split == "replicated":
        return {rule.hf[0]: shards[0]}
    if rule.split == "columns":
        return {rule.hf[0]: torch.cat(shards, dim=1)}
    if rule.split == "vocab":
        return {rule.hf[0]: torch.cat(shards)[:cfg.vocab_size]}
    if rule.split == "gated":
        halves = [shard.chunk(2) for shard in shards]
        return {rule.hf[0]: torch.cat([h[0] for h in halves]), rule.hf[1]: torch.cat([h[1] for h in halves])}
    D = cfg.head_size
    heads = torch.cat(shards).split(D)
    parts: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    for (source, _), block in zip(_qkv_blocks(cfg), heads):
        parts[source].append(block)
    return {name: torch.cat(part) for name, part in zip(rule.hf, parts)}


@torch.no_grad()
def whole(param: Tensor, *, modify: bool = False):
    """Context exposing the whole local (TP-shard) tensor of a parameter, even if DeepSpeed ZeRO-3
    partitioned it over the data-parallel ranks. With `modify`, what data-parallel rank 0 writes into
    it is scattered back to every rank's partition on exit (collective over the DP group)."""
    if hasattr(param, "ds_id"):
        import deepspeed
        return deepspeed.zero.GatheredParameters([param], modifier_rank=0 if modify else None)
    return contextlib.nullcontext()


def fill_from_reader(model, read: Reader, tp: int, rank: int) -> None:
    """Copy every parameter of `model` (a LlamaGPT) for TP rank `rank` from `read`.

    Under ZeRO-3 (a model built inside `deepspeed.zero.Init`) every rank gathers one parameter at a
    time and data-parallel rank 0's copy is partitioned back; the reads are the same on every rank."""
    params = dict(model.named_parameters())
    for rule in tensor_rules(model.model_config):
        param = params.pop(rule.megatron)
        shard = shard_from_hf(rule, read, model.model_config, tp, rank, model.padded_vocab)
        with whole(param, modify=True), torch.no_grad():
            if shard.shape != param.shape:
                raise CheckpointError(f"{rule.megatron}: built a shard of shape {list(shard.shape)} from "
                                      f"{rule.hf}, the model expects {list(param.shape)}")
            param.copy_(shard)
    if params:
        raise RuntimeError(f"parameters without an import rule: {sorted(params)}")

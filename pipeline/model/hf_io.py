"""Hugging Face checkpoints in and out of the tensor-parallel model.

`load_hf(path, ctx)` builds `LlamaGPT` from a folder's config.json without initialising it, checks
every tensor's presence and shape against that config before reading any weight, then gives each TP
rank only its slices (read lazily, see `checkpoint_files.py`). `save_hf(model, path, ctx)` walks the
parameters in order, gathers each one's TP shards (and, under DeepSpeed ZeRO-3, its data-parallel
partitions) to global rank 0, which turns them back into Hugging Face tensors and writes a folder
that `transformers` loads with `from_pretrained`, tokenizer files alongside when given.

Design choice: parameter by parameter, so no rank ever holds more than one full tensor beyond its
own shards and rank 0's writer flushes a file every few GiB; the cost is one collective per
parameter, which is nothing next to the disk.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.config import ComputeConfig, ModelConfig
from pipeline.model.builder import LlamaGPT, build_model
from pipeline.model.checkpoint_files import CheckpointError, SafetensorsFolder, ShardedWriter
from pipeline.model.hf_config import hf_config_dict, model_config_from_hf
from pipeline.model.layout import (TensorRule, check_tp, fill_from_reader, hf_from_shards, hf_shapes, tensor_rules,
                                   whole)
from pipeline.parallel import ParallelContext

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed here


def check_checkpoint(files: SafetensorsFolder, cfg: ModelConfig) -> None:
    """CheckpointError naming the first missing, misshapen or unexpected tensor."""
    expected = hf_shapes(cfg)
    present = set(files.names())
    for name, shape in expected.items():
        if name not in present:
            raise CheckpointError(f"{files.folder}: missing tensor {name!r} (config.json describes "
                                  f"{cfg.num_layers} layers of a {cfg.architecture} model)")
        if files.shape(name) != shape:
            raise CheckpointError(f"{files.where(name)}: tensor {name!r} has shape {list(files.shape(name))}, "
                                  f"expected {list(shape)} from config.json")
    unexpected = sorted(n for n in present if n not in expected and not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(f"{files.folder}: unexpected tensors {unexpected[:4]} (not part of a "
                              f"{cfg.architecture} model with this config.json)")


def load_hf(path: str | Path, ctx: ParallelContext, compute: ComputeConfig = ComputeConfig()) -> LlamaGPT:
    """The model of a Hugging Face folder on this rank: its TP slices only, in `compute.dtype`."""
    cfg = model_config_from_hf(path)
    check_tp(cfg, ctx.tp_size, ctx.device.type)
    files = SafetensorsFolder(path)
    check_checkpoint(files, cfg)
    model = build_model(cfg, compute, ctx, initialize=False)
    fill_from_reader(model, files.read, ctx.tp_size, ctx.tp_rank)
    files.close()
    return model


def gathered_hf_tensors(model: LlamaGPT, ctx: ParallelContext):
    """Yield (HF name, full tensor) on global rank 0, in checkpoint order; the other ranks yield nothing.

    Collective: every rank must iterate it to the end.
    """
    params = dict(model.named_parameters())
    tp_src = ctx.tp_src_rank
    for rule in tensor_rules(model.model_config):
        param = params[rule.megatron]
        with whole(param):
            shards = _gather_tp(param.detach(), ctx, tp_src, rule) if ctx.dp_rank == 0 else None
        if ctx.rank == 0:
            yield from hf_from_shards(rule, shards, model.model_config).items()


def _gather_tp(shard: Tensor, ctx: ParallelContext, tp_src: int, rule: TensorRule) -> Optional[list[Tensor]]:
    if ctx.tp_size == 1:
        return [shard.cpu().clone()]
    if rule.split == "replicated":
        return [shard.cpu().clone()] if ctx.rank == tp_src else None
    shard = shard.contiguous()
    pieces = [torch.empty_like(shard) for _ in range(ctx.tp_size)] if ctx.rank == tp_src else None
    dist.gather(shard, pieces, dst=tp_src, group=ctx.tp_group)
    return None if pieces is None else [p.cpu() for p in pieces]


def save_hf(model: LlamaGPT, path: str | Path, ctx: ParallelContext, *, tokenizer: Optional[str | Path] = None,
            overwrite: bool = False, max_shard_bytes: int = 4 << 30) -> Optional[Path]:
    """Write the model as a Hugging Face folder at `path` (collective; rank 0 writes). Returns the path on rank 0.

    Refuses an existing non-empty `path` unless `overwrite`; appears atomically (see ShardedWriter).
    """
    refuse_existing(path, overwrite)  # every rank checks, so all raise together
    tensors = gathered_hf_tensors(model, ctx)
    if ctx.rank != 0:
        for _ in tensors:
            pass
        dist.barrier()
        return None
    result = write_hf_folder(tensors, model.model_config, path, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)
    dist.barrier()
    return result


def refuse_existing(path: str | Path, overwrite: bool) -> None:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path}: exists and is not empty; choose another folder or allow overwriting (--force)")


def write_hf_folder(tensors: Iterable[tuple[str, Tensor]], cfg: ModelConfig, path: str | Path, *,
                    tokenizer: Optional[str | Path] = None, max_shard_bytes: int = 4 << 30) -> Path:
    """Write HF-named tensors, config.json and the tokenizer files as a folder `from_pretrained` loads."""
    writer = ShardedWriter(path, max_bytes=max_shard_bytes)
    dtype = torch.float32
    for name, tensor in tensors:
        writer.add(name, tensor)
        dtype = tensor.dtype
    ids = copy_tokenizer(tokenizer, writer) if tokenizer is not None else {}
    config = hf_config_dict(cfg, dtype, **ids)
    writer.extra_file("config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    return writer.finish()


def copy_tokenizer(source: str | Path, writer: ShardedWriter) -> dict[str, int]:
    """Put the tokenizer next to the weights; a bare tokenizer.json also gets a tokenizer_config.json.

    Returns the bos/eos ids found, for config.json.
    """
    from tokenization.tokenizer import DEFAULT_EOS, load_tokenizer

    source = Path(source)
    tok = load_tokenizer(source)
    if source.is_dir():
        for file in source.iterdir():
            if file.is_file() and file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy2(file, writer.extra_file(file.name))
    else:
        shutil.copy2(source, writer.extra_file("tokenizer.json"))
    config_file = writer.extra_file("tokenizer_config.json")
    if not config_file.exists():
        eos = DEFAULT_EOS if tok.token_to_id(DEFAULT_EOS) is not None else None
        config_file.write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
                                           "clean_up_tokenization_spaces": False}, indent=2))
    eos_id = tok.token_to_id(DEFAULT_EOS)
    return {} if eos_id is None else {"eos_id": eos_id, "bos_id": eos_id}

"""The pre-split checkpoint format: one safetensors file per TP rank, in megatron-core's parameter names.

A Hugging Face folder is read by every rank slice by slice (see `hf_io.load_hf`), which is fine for a
teacher loaded once; a job that starts many times at one TP size (a cache job array, a student
restarted after preemption) can convert once instead, so each rank reads one contiguous file of its
own. The folder holds `model.yaml` (the ModelConfig), `layout.json` (format, TP size, padded vocabulary,
dtype) and `tp-{r:02d}-of-{t:02d}.safetensors`. Conversion either way runs in one process without
torch.distributed: it is the same pure mapping (`layout.py`) the distributed import and export use.

Design choice: the padded vocabulary and TP size are fixed in the files, so loading at another TP
size is refused (convert from the HF folder again); the cost is one conversion per layout.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from pipeline.config import ComputeConfig, ModelConfig, config_to_dict, from_dict
from pipeline.model.builder import LlamaGPT, build_model
from pipeline.model.checkpoint_files import CheckpointError, SafetensorsFolder
from pipeline.model.hf_config import model_config_from_hf
from pipeline.model.hf_io import check_checkpoint, load_hf, refuse_existing, write_hf_folder
from pipeline.model.layout import check_tp, hf_from_shards, shard_from_hf, tensor_rules
from pipeline.parallel import ParallelContext, pad_vocab_size

FORMAT = "distill-tp-checkpoint"
VERSION = 1


def rank_file(rank: int, tp: int) -> str:
    return f"tp-{rank:02d}-of-{tp:02d}.safetensors"


def is_tp_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "layout.json").is_file()


def read_layout(path: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, layout dict) of a TP checkpoint folder; CheckpointError naming the file if unreadable."""
    path = Path(path)
    try:
        layout = json.loads((path / "layout.json").read_text())
        cfg = from_dict(ModelConfig, yaml.safe_load((path / "model.yaml").read_text()))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable TP checkpoint ({err})") from None
    if layout.get("format") != FORMAT or layout.get("version") != VERSION:
        raise CheckpointError(f"{path / 'layout.json'}: expected format {FORMAT} version {VERSION}, got "
                              f"{layout.get('format')} version {layout.get('version')}")
    return cfg, layout


def hf_to_tp_checkpoint(hf_path: str | Path, out: str | Path, tp: int, *, vocab_multiple: int = 128,
                        dtype: Optional[torch.dtype] = None, overwrite: bool = False, progress=None) -> Path:
    """Split a Hugging Face folder into a TP checkpoint for `tp` ranks (one process, lazy reads)."""
    refuse_existing(out, overwrite)
    cfg = model_config_from_hf(hf_path)
    check_tp(cfg, tp)
    files = SafetensorsFolder(hf_path)
    check_checkpoint(files, cfg)
    padded = pad_vocab_size(cfg.vocab_size, tp, vocab_multiple)
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for rank in range(tp):
        shards = {}
        for rule in tensor_rules(cfg):
            shard = shard_from_hf(rule, files.read, cfg, tp, rank, padded)
            shards[rule.megatron] = (shard if dtype is None else shard.to(dtype)).contiguous()
        save_file(shards, str(partial / rank_file(rank, tp)), metadata={"format": "pt"})
        written_dtype = next(iter(shards.values())).dtype
        if progress:
            progress(rank + 1, tp)
    (partial / "model.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    layout = {"format": FORMAT, "version": VERSION, "tp": tp, "vocab_multiple": vocab_multiple,
              "padded_vocab": padded, "dtype": str(written_dtype).removeprefix("torch."),
              "source": str(Path(hf_path).resolve())}
    (partial / "layout.json").write_text(json.dumps(layout, indent=2))
    _replace(partial, out)
    return out


def _replace(partial: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)


def load_tp_checkpoint(path: str | Path, ctx: ParallelContext, compute: ComputeConfig = ComputeConfig()) -> LlamaGPT:
    """The model of a TP checkpoint on this rank, reading only this rank's file."""
    cfg, layout = read_layout(path)
    if layout["tp"] != ctx.tp_size or layout["vocab_multiple"] != compute.vocab_multiple:
        raise CheckpointError(f"{path}: split for tp={layout['tp']}, vocab_multiple={layout['vocab_multiple']}; "
                              f"this job has tp={ctx.tp_size}, vocab_multiple={compute.vocab_multiple} (convert "
                              f"the Hugging Face checkpoint again for this layout)")
    model = build_model(cfg, compute, ctx, initialize=False)
    file = Path(path) / rank_file(ctx.tp_rank, ctx.tp_size)
    with torch.no_grad(), safe_open(file, framework="pt") as handle:
        for name, param in model.named_parameters():
            if name not in handle.keys():
                raise CheckpointError(f"{file}: missing tensor {name!r}")
            tensor = handle.get_tensor(name)
            if tensor.shape != param.shape:
                raise CheckpointError(f"{file}: tensor {name!r} has shape {list(tensor.shape)}, "
                                      f"expected {list(param.shape)}")
            param.copy_(tensor)
    return model


def _hf_tensors(path: Path, cfg: ModelConfig, tp: int) -> Iterator[tuple[str, Tensor]]:
    handles = [safe_open(path / rank_file(rank, tp), framework="pt") for rank in range(tp)]
    for rule in tensor_rules(cfg):
        yield from hf_from_shards(rule, [h.get_tensor(rule.megatron) for h in handles], cfg).items()


def tp_checkpoint_to_hf(path: str | Path, out: str | Path, *, tokenizer: Optional[str | Path] = None,
                        overwrite: bool = False, max_shard_bytes: int = 4 << 30) -> Path:
    """Join a TP checkpoint back into a Hugging Face folder (one process)."""
    refuse_existing(out, overwrite)
    cfg, layout = read_layout(path)
    return write_hf_folder(_hf_tensors(Path(path), cfg, layout["tp"]), cfg, out, tokenizer=tokenizer,
                           max_shard_bytes=max_shard_bytes)


def load_model(path: str | Path, ctx: ParallelContext, compute: ComputeConfig = ComputeConfig()) -> LlamaGPT:
    """A model from either a Hugging Face folder or a TP checkpoint folder, whichever `path` is."""
    return load_tp_checkpoint(path, ctx, compute) if is_tp_checkpoint(path) else load_hf(path, ctx, compute)

"""Resume a checkpoint on another layout: another DP size, another TP size, or both.

A checkpoint saved at `tp × dp` resumes at `tp' × dp'` with the same global batch (micro_batch ×
grad_accumulation × dp) and the same sample order; what cannot change (model, data, loss, micro-batch,
global batch, seed) is refused by the identity check of checkpoints.py. Three things move:

- Weights and Adam state. Rank 0 converts each old TP rank's ZeRO-3 files (a folder of symlinks renamed
  `mp_rank_00`, as export.py does) with DeepSpeed's `ds_to_universal` into a universal checkpoint: one file
  per parameter and state (fp32 master weight, exp_avg, exp_avg_sq), whole over DP. When TP changes, every
  parameter's three states are joined over the old TP ranks and split for the new ones with the same
  mapping HF import/export use (`layout.py`: fused QKV by head block, gate/up halves, vocabulary rows,
  padding rows re-made as zeros), so the moments are resliced exactly like the weights. Every rank then
  loads its TP rank's folder with DeepSpeed's own ZeRO-3 universal loader, which partitions each
  parameter over the new DP group. The folder is `checkpoints/.reshard-<tag>-tp<N>`, removed after loading.
- Data cursors. Slot i of DP rank r reads reader rank r·G + i of dp·G (stream.py); with dp × G
  unchanged the global list of reader ranks is the same, only their assignment to ranks moves, so each
  new slot takes the saved cursor of its reader rank (checked by the reader: seed, data, size, micro-batch).
- RNG states. Nothing a step computes draws from them (the model has no dropout; generation seeds
  its draws from the sample's key), so they are not resharded: each new rank restores the state of
  the old rank that held its first data slot (same TP rank, or TP rank 0 when TP grew).

Design choice: DeepSpeed's universal format and loader, with our own TP reslicing between them. The
installed DeepSpeed (0.19.8) converts and loads ZeRO-3 universal checkpoints on CPU, but it reslices
TP only for AutoTP models with its own metadata; megatron-core's fused QKV and gate/up layout are ours,
and layout.py already maps them, so TP goes through it. DeepSpeed keeps the flat-partition bookkeeping.
The cost: a layout change writes the whole fp32 state once more (12 bytes per parameter, plus
ds_to_universal's fragments, on rank 0's disk) and rank 0 converts while the other ranks wait at a
barrier (parallel.timeout_minutes bounds it); a resume on the same layout reads the files directly.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import ModelConfig, TrainConfig
from pipeline.model.layout import hf_from_shards, shard_from_hf, tensor_rules
from pipeline.parallel import ParallelContext, pad_vocab_size
from pipeline.train.errors import TrainError

STATES = ("fp32", "exp_avg", "exp_avg_sq")
STATE_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # the one engine-state file a universal folder holds


def saved_layout(record: dict) -> tuple[int, int]:
    """(tp, dp) a checkpoint was saved with, from its run.json record."""
    layout = record.get("layout", {})
    return int(layout["tp"]), int(layout["dp"])


def resume_grad_accumulation(cfg: TrainConfig, record: dict, dp: int) -> int:
    """The grad_accumulation that resumes `record` at `dp` ranks with the checkpoint's global batch.

    A grad_accumulation that already gives the saved global batch is kept; the saved one on another dp
    (the same command after a restart on fewer or more nodes) is derived: global / (micro_batch × dp).
    Anything else is returned as set, and the identity check refuses the changed global batch by name."""
    schedule = record["config"]["schedule"]
    micro, saved_g = int(schedule["micro_batch"]), int(schedule["grad_accumulation"])
    saved_dp = saved_layout(record)[1]
    wanted = micro * saved_g * saved_dp
    g = cfg.schedule.grad_accumulation
    if micro != cfg.schedule.micro_batch or micro * g * dp == wanted or dp == saved_dp or g != saved_g:
        return g
    if wanted % (micro * dp):
        raise TrainError(f"the checkpoint's global batch {wanted} (schedule.micro_batch={micro} × "
                         f"grad_accumulation={saved_g} × dp={saved_dp}) cannot be kept at dp={dp}: "
                         f"{wanted} is not a multiple of micro_batch × dp = {micro * dp}. Resume with a dp that "
                         f"divides {wanted // micro}")
    return wanted // (micro * dp)


def with_grad_accumulation(cfg: TrainConfig, g: int) -> TrainConfig:
    return replace(cfg, schedule=replace(cfg.schedule, grad_accumulation=g))


def rank_state(folder: Path, record: dict, ctx: ParallelContext, slots: int, trainer_dir: str) -> dict:
    """This rank's trainer state (counters, data cursors, RNG) from the trainer files of another layout."""
    old_tp, old_dp = saved_layout(record)
    old_g = int(record["config"]["schedule"]["grad_accumulation"])

    def load(dp_rank: int, tp_rank: int) -> dict:
        path = folder / trainer_dir / f"rank_{dp_rank * old_tp + tp_rank:05d}.pt"
        if not path.is_file():
            raise TrainError(f"{path} is missing: {folder.name} (tp={old_tp} × dp={old_dp}) is damaged")
        return torch.load(path, weights_only=False)

    first = ctx.dp_rank * slots  # the reader rank of this rank's first slot
    own = load(first // old_g, ctx.tp_rank if ctx.tp_rank < old_tp else 0)
    cursors = {}
    for reader in range(first, first + slots):
        state = load(reader // old_g, 0)["data"]["slots"][reader % old_g]
        if int(state.get("dp_rank", -1)) != reader:
            raise TrainError(f"{folder / trainer_dir}: slot {reader % old_g} of dp rank {reader // old_g} holds the "
                             f"cursor of reader rank {state.get('dp_rank')}, expected {reader}")
        cursors[reader] = state
    return {**own, "data": {"slots": [cursors[r] for r in range(first, first + slots)]}}


def _universal(tag_folder: Path, tp_rank: int, out: Path, scratch: Path) -> None:
    """ds_to_universal of one old TP rank's ZeRO-3 files (presented as a TP-1 checkpoint) into `out`."""
    from deepspeed.checkpoint import ds_to_universal

    from pipeline.train.export import OPTIM_FILE

    view = scratch / f"view_tp{tp_rank:02d}"
    view.mkdir(parents=True)
    for file in tag_folder.iterdir():
        match = OPTIM_FILE.match(file.name)
        if match and int(match[3]) == tp_rank:
            dp = int(match[2])
            model = tag_folder / f"zero_pp_rank_{dp}_mp_rank_{tp_rank:02d}_model_states.pt"
            os.symlink(file.resolve(), view / f"{match[1] or ''}zero_pp_rank_{dp}_mp_rank_00_optim_states.pt")
            os.symlink(model.resolve(), view / f"zero_pp_rank_{dp}_mp_rank_00_model_states.pt")
    args = argparse.Namespace(input_folder=str(view), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
    except Exception as err:  # any failure to read DeepSpeed's files means a damaged checkpoint
        raise TrainError(f"{tag_folder}: DeepSpeed cannot convert the ZeRO-3 files of tp rank {tp_rank} to a "
                         f"universal checkpoint ({type(err).__name__}: {err})") from err
    (out.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal points its parent at it


def _shard_shapes(universal: Path) -> dict[str, torch.Size]:
    state = torch.load(universal / STATE_FILE, map_location="cpu", weights_only=False)
    return {name: torch.Size(shape) for group in state["param_shapes"] for name, shape in group.items()}


def read_state(path: Path) -> torch.Tensor:
    value = torch.load(path, map_location="cpu", weights_only=False)
    return value["param"] if isinstance(value, dict) else value


def _retile(old: list[Path], new: list[Path], model: ModelConfig, vocab_multiple: int) -> None:
    """Every parameter's fp32 weight and Adam moments, from the old TP ranks' universal folders to the new."""
    old_shapes = [_shard_shapes(folder) for folder in old]
    padded = pad_vocab_size(model.vocab_size, len(new), vocab_multiple)
    for folder in new:
        (folder / "zero").mkdir(parents=True)
        shutil.copy2(old[0] / STATE_FILE, folder / STATE_FILE)  # counters and lr schedule, equal on every rank
        shutil.copy2(old[0] / "zero" / "optimizer_state.pt", folder / "zero" / "optimizer_state.pt")
    for rule in tensor_rules(model):
        for state in STATES:
            shards = [read_state(folder / "zero" / rule.megatron / f"{state}.pt").view(shapes[rule.megatron])
                      for folder, shapes in zip(old, old_shapes)]
            full = hf_from_shards(rule, shards, model)

            def read(name, dim, start, end):
                return full[name] if dim is None else full[name].narrow(dim, start, end - start)

            for rank, folder in enumerate(new):
                shard = shard_from_hf(rule, read, model, len(new), rank, padded)
                (folder / "zero" / rule.megatron).mkdir(exist_ok=True)
                torch.save({"param": shard.contiguous().view(-1)}, folder / "zero" / rule.megatron / f"{state}.pt")


def build(tag_folder: Path, out: Path, record: dict, model: ModelConfig, tp: int, vocab_multiple: int) -> None:
    """Write `out`/tp_RR (one universal checkpoint per new TP rank) from the checkpoint in `tag_folder`."""
    old_tp = saved_layout(record)[0]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    old = [partial / "old" / f"tp_{r:02d}" for r in range(old_tp)]
    for rank, folder in enumerate(old):
        _universal(tag_folder, rank, folder, partial / "views")
    if tp == old_tp:
        os.replace(partial / "old", partial / "new")
    else:
        _retile(old, [partial / "new" / f"tp_{r:02d}" for r in range(tp)], model, vocab_multiple)
    os.replace(partial / "new", out)
    shutil.rmtree(partial)


def load(engine, out: Path, ctx: ParallelContext) -> None:
    """Load this rank's TP folder of `out` into `engine` with DeepSpeed's ZeRO-3 universal loader (collective)."""
    config = engine._config
    config.load_universal_checkpoint = True
    try:
        path, _ = engine.load_checkpoint(str(out), tag=f"tp_{ctx.tp_rank:02d}", load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise TrainError(f"DeepSpeed could not load the resharded checkpoint {out / f'tp_{ctx.tp_rank:02d}'}")


def resume(store, tag: str, record: dict, engine, cfg: TrainConfig, ctx: ParallelContext, trainer_dir: str) -> dict:
    """Load checkpoint `tag` of another layout into `engine` on every rank; this rank's trainer state."""
    out = store.root / f".reshard-{tag}-tp{ctx.tp_size}"
    if ctx.rank == 0:
        build(store.root / tag, out, record, cfg.model.architecture_config(), ctx.tp_size, cfg.compute.vocab_multiple)
    if ctx.world_size > 1:
        dist.barrier()
    load(engine, out, ctx)
    state = rank_state(store.root / tag, record, ctx, cfg.schedule.grad_accumulation, trainer_dir)
    if ctx.world_size > 1:
        dist.barrier()
    if ctx.rank == 0:
        shutil.rmtree(out)
    return state

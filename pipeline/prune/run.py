"""`distill prune` end to end: targets, calibration, selection, the student folder and its report.

Order: the targets are checked against the teacher's config before anything heavy happens; the teacher
is loaded at `--tp` over a world of exactly `--tp` processes (a TP checkpoint split for that TP directly; at
TP 1 any TP checkpoint, joined into a temporary Hugging Face folder first) and calibrated (`calibrate.py`,
collective over the TP group, identical statistics on every rank); the parallel context then becomes TP 1 and
rank 0 alone does the rest while the others wait for its report: depth is chosen first (`--depth fixed`:
evenly spaced layers, 0, 2, 4, … at half depth; `importance`: the layers whose skipping changes the output
least), then within each kept layer the MLP
channels and key/value groups, and the hidden channels once for all; the teacher's tensors are cut
(`slicing.py`) into `<out>.prune`, the student is loaded back through our own loader to measure its loss on
the same tokens, `prune_report.json` is added, and the folder is renamed to `out`.

Design choice: the folder appears whole with its report or not at all, and its loss is measured by
loading what was written (so the report describes the files, not an in-memory copy); the cost is one
more load and forward of the (small) student, on rank 0 only, at TP 1 (so a student whose heads do not split
over `--tp` is fine). World = tp (no data parallelism): calibration is a few thousand tokens, and one replica
runs the same batches as TP 1, so the report is TP 1's up to float rounding; the cost is that more GPUs
than the teacher's TP do not make calibration faster.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from pipeline.config import ModelConfig
from pipeline.prune.calibrate import Calibration, calibrate, calibration_samples, mean_loss
from pipeline.prune.errors import PruneError
from pipeline.prune.slicing import Selection, group_scores, student_tensors, top_k
from pipeline.prune.targets import fixed_layers, parameter_count, pruned_config

REPORT = "prune_report.json"


def teacher_config(path: str | Path) -> ModelConfig:
    """The teacher's architecture (Hugging Face folder or TP checkpoint), read without any weight."""
    from pipeline.model.hf_config import model_config_from_hf
    from pipeline.model.tp_checkpoint import is_tp_checkpoint, read_layout

    return read_layout(path)[0] if is_tp_checkpoint(path) else model_config_from_hf(path)


def select(cal: Calibration, teacher: ModelConfig, student: ModelConfig, depth: str) -> Selection:
    """The kept layers (depth first), then per kept layer the MLP channels and kv groups, and the hidden channels."""
    if student.num_layers == teacher.num_layers:
        layers = list(range(teacher.num_layers))
    elif depth == "fixed":
        layers = fixed_layers(teacher.num_layers, student.num_layers)
    else:
        layers = top_k(cal.layer_kl, student.num_layers)
    return Selection(layers=layers, hidden=top_k(cal.hidden, student.hidden_size),
                     mlp=[top_k(cal.mlp[i], student.intermediate_size) for i in layers],
                     kv_groups=[top_k(group_scores(cal.heads[i], teacher.kv_heads), student.kv_heads)
                                for i in layers])


def _hf_teacher(teacher: str | Path, scratch: Path) -> Path:
    from pipeline.model.tp_checkpoint import is_tp_checkpoint, tp_checkpoint_to_hf

    if not is_tp_checkpoint(teacher):
        return Path(teacher)
    joined = scratch / "teacher"  # joined once per run, whether for loading at TP 1 or for cutting
    return joined if joined.is_dir() else tp_checkpoint_to_hf(teacher, joined)


def _teacher_tensors(folder: Path, cfg: ModelConfig):
    from pipeline.model.checkpoint_files import SafetensorsFolder
    from pipeline.model.layout import hf_shapes

    files = SafetensorsFolder(folder)
    try:
        for name in hf_shapes(cfg):
            yield name, files.read(name)
    finally:
        files.close()


def _world_size() -> int:
    import torch.distributed as dist

    from pipeline.parallel import read_launch_env

    return dist.get_world_size() if dist.is_initialized() else read_launch_env().world_size


def _load_teacher(teacher: str | Path, ctx, scratch: Path):
    """The teacher at `ctx`'s TP: a TP checkpoint split for it directly, another one (only at TP 1) joined first."""
    from pipeline.config import ComputeConfig
    from pipeline.model import load_model
    from pipeline.model.tp_checkpoint import is_tp_checkpoint, read_layout

    compute = ComputeConfig()
    if is_tp_checkpoint(teacher):
        layout = read_layout(teacher)[1]
        if layout["tp"] == ctx.tp_size:
            compute = ComputeConfig(vocab_multiple=layout["vocab_multiple"])
        elif ctx.tp_size == 1:
            teacher = _hf_teacher(teacher, scratch)
        else:
            raise PruneError(f"--teacher {teacher}: a TP checkpoint split for tp={layout['tp']}; run with "
                             f"--tp {layout['tp']} (or --tp 1, which joins it first)")
    return load_model(teacher, ctx, compute).eval().requires_grad_(False)


def _checked(tp: int, batch_size: int, depth: str) -> None:
    if depth not in ("fixed", "importance"):
        raise PruneError(f"--depth {depth!r}: expected fixed or importance")
    if batch_size < 1:
        raise PruneError(f"--batch-size {batch_size}: expected at least 1")
    if tp < 1 or _world_size() != tp:
        raise PruneError(f"--tp {tp}: expected the number of processes ({_world_size()}); distill prune runs "
                         f"one teacher replica (world = tp, e.g. torchrun --nproc-per-node {max(tp, 1)})")


def prune(*, teacher: str | Path, tokens: str | Path, out: str | Path, samples: int,
          num_layers: Optional[int] = None, hidden_size: Optional[int] = None,
          intermediate_size: Optional[int] = None, num_heads: Optional[int] = None, params: Optional[int] = None,
          depth: str = "fixed", batch_size: int = 8, seed: int = 0, overwrite: bool = False, tp: int = 1,
          progress: bool = False) -> dict:
    """Write the pruned student to `out` (a Hugging Face folder with prune_report.json) and return the report.

    Collective when `tp` > 1 (every rank of a world of `tp` processes calls it): every rank calibrates its
    slices of the teacher; rank 0 alone writes `out`; every rank returns the same report once `out` exists.
    """
    from pipeline.model.hf_io import refuse_existing
    from pipeline.parallel import ParallelContext

    _checked(tp, batch_size, depth)
    teacher_cfg = teacher_config(teacher)
    student_cfg = pruned_config(teacher_cfg, num_layers=num_layers, hidden_size=hidden_size,
                                intermediate_size=intermediate_size, num_heads=num_heads, params=params)
    out = Path(out)
    refuse_existing(out, overwrite)
    ids, mask = calibration_samples(str(tokens), samples)
    if int(ids.max()) >= teacher_cfg.vocab_size:
        raise PruneError(f"{tokens}: token id {int(ids.max())} but the teacher scores {teacher_cfg.vocab_size} ids")
    started = time.perf_counter()
    ctx = ParallelContext.from_env(tp)
    try:
        ctx.seed(seed)
        with tempfile.TemporaryDirectory(prefix="distill-prune-") as scratch:
            model = _load_teacher(teacher, ctx, Path(scratch))
            cal = calibrate(model, ids, mask, ctx, batch_size=batch_size, progress=progress and ctx.rank == 0,
                            layer_importance=depth == "importance" and student_cfg.num_layers < teacher_cfg.num_layers)
            del model
            ctx = ctx.with_tp(1)  # the student need not split over tp ranks; rank 0 writes and measures it alone
            outcome = None
            if ctx.rank == 0:
                inputs = dict(teacher=str(teacher), tokens=str(tokens), samples=samples, seed=seed, tp=tp)
                outcome = _write_student(teacher, Path(scratch), teacher_cfg, student_cfg, cal, depth, ids, mask,
                                         out, ctx, batch_size=batch_size, inputs=inputs,
                                         calibration_s=time.perf_counter() - started)
            outcome = _from_rank0(outcome, ctx)
    finally:
        ctx.destroy()
    if isinstance(outcome, str):
        raise PruneError(outcome)
    return outcome


def _from_rank0(outcome, ctx):
    """Rank 0's report (or its error, as text) on every rank; the others wait here while rank 0 writes."""
    import torch.distributed as dist

    if ctx.world_size == 1:
        return outcome
    box = [outcome]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_student(teacher, scratch: Path, teacher_cfg: ModelConfig, student_cfg: ModelConfig, cal: Calibration,
                   depth: str, ids, mask, out: Path, ctx, *, batch_size: int, calibration_s: float, inputs: dict):
    """Rank 0: cut the teacher's stored tensors into `<out>.prune`, measure it, add the report, rename to `out`.

    Returns the report; in a world of several ranks an exception becomes its text (the caller raises it on every
    rank, so none waits forever); alone it propagates as it is.
    """
    from pipeline.model.hf_io import load_hf, write_hf_folder
    from tokenization.format import write_atomic

    staging = out.with_name(out.name + ".prune")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        sel = select(cal, teacher_cfg, student_cfg, depth)
        folder = _hf_teacher(teacher, scratch)
        tokenizer = next((p for p in (folder, Path(teacher)) if (p / "tokenizer.json").is_file()), None)
        write_hf_folder(student_tensors(_teacher_tensors(folder, teacher_cfg), sel, teacher_cfg), student_cfg,
                        staging, tokenizer=tokenizer)
        student = load_hf(staging, ctx).eval().requires_grad_(False)
        student_loss = mean_loss(student, ids, mask, ctx, batch_size=batch_size)
        report = _report(teacher_cfg, student_cfg, sel, cal, depth, student_loss, calibration_s, inputs)
        write_atomic(staging / REPORT, (json.dumps(report, indent=1) + "\n").encode())
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
        return report
    except Exception as error:  # noqa: BLE001 - reported to every rank by the caller
        if ctx.world_size == 1:
            raise
        return f"rank 0 failed writing {out}: {type(error).__name__}: {error}"


def _sizes(cfg: ModelConfig) -> dict:
    return {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_heads": cfg.num_heads, "num_kv_heads": cfg.kv_heads, "head_dim": cfg.head_size,
            "parameters": parameter_count(cfg)}


def _floats(tensor: torch.Tensor) -> list[float]:
    return [round(float(x), 6) for x in tensor]


def _report(teacher: ModelConfig, student: ModelConfig, sel: Selection, cal: Calibration, depth: str,
            student_loss: float, calibration_s: float, inputs: dict) -> dict:
    per_group = teacher.num_heads // teacher.kv_heads
    return {**inputs, "depth": depth, "calibration_positions": cal.positions,
            "calibration_seconds": round(calibration_s, 2),
            "teacher": _sizes(teacher), "student": _sizes(student),
            "teacher_loss": cal.loss, "student_loss": student_loss,
            "kept_layers": sel.layers,
            "layer_importance_kl": None if cal.layer_kl is None else _floats(cal.layer_kl),
            "kept_kv_heads": sel.kv_groups,
            "kept_query_heads": [sel.query_heads(j, per_group) for j in range(len(sel.layers))],
            "kv_group_scores": [_floats(group_scores(cal.heads[i], teacher.kv_heads)) for i in sel.layers],
            "kept_hidden_channels": sel.hidden, "hidden_channel_scores": _floats(cal.hidden),
            "kept_mlp_channels": sel.mlp, "mlp_channel_scores": [_floats(cal.mlp[i]) for i in sel.layers]}


def summary(report: dict) -> str:
    """The report in a few lines for the terminal (the JSON has every index and score)."""
    t, s = report["teacher"], report["student"]
    lines = [f"teacher  {t['num_layers']} layers, hidden {t['hidden_size']}, mlp {t['intermediate_size']}, "
             f"heads {t['num_heads']}/{t['num_kv_heads']} kv: {t['parameters']:,} parameters",
             f"student  {s['num_layers']} layers, hidden {s['hidden_size']}, mlp {s['intermediate_size']}, "
             f"heads {s['num_heads']}/{s['num_kv_heads']} kv: {s['parameters']:,} parameters",
             f"kept layers ({report['depth']}): {report['kept_layers']}"]
    if report["layer_importance_kl"] is not None:
        lines.append("layer importance, KL(full ‖ skipped): "
                     + " ".join(f"{i}:{v:.4g}" for i, v in enumerate(report["layer_importance_kl"])))
    lines.append(f"loss on {report['calibration_positions']} calibration positions: teacher "
                 f"{report['teacher_loss']:.4f}, pruned student {report['student_loss']:.4f} (before training)")
    lines.append(f"loading and calibrating the teacher took {report['calibration_seconds']:.1f} s")
    return "\n".join(lines)

"""`distill eval` in one process of world = dp × tp: load both models, read the prompts, measure, pool.

The `tp` ranks of one DP group hold one copy of each model (their TP slices) and generate the same
tokens; the DP groups split the prompts (every dp-th of the first N) and all-reduce their sums, so the
figures do not depend on the process count. A path that is neither a Hugging Face folder nor a TP
checkpoint is read as a training run (or its checkpoints folder, or one tag folder) and exported to a
temporary Hugging Face folder first; the cost is one ZeRO-3 consolidation per process (each process
exports for itself, so nothing has to be shared between nodes).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from pipeline.config import ComputeConfig, RiskSamplingConfig, config_to_dict
from pipeline.eval.errors import RiskError


def model_folder(path: str, scratch: Path, name: str) -> str:
    """`path` itself when it is a Hugging Face folder or a TP checkpoint, else the export of a training run's
    checkpoint (run folder: its latest) into `scratch/name`."""
    from pipeline.model.tp_checkpoint import is_tp_checkpoint
    from pipeline.train.export import export_checkpoint, resolve_tag_folder

    if (Path(path) / "config.json").is_file() or is_tp_checkpoint(path):
        return path
    tag_folder = resolve_tag_folder(path)  # a CheckpointError naming what was expected if it is none of them
    return str(export_checkpoint(tag_folder, scratch / name, progress=False))


def evaluate_pair(*, student: str, teacher: str, tokens: str, prompts: int, prompt_len: int,
                  sampling: RiskSamplingConfig, seed: int = 0, tp: int = 1, vocab_multiple: int = 128,
                  dtype: str = "auto", backend: str = "auto") -> Optional[dict]:
    """The risks of `student` against `teacher` with the settings they were measured with (global rank 0;
    None on the other ranks). Collective over the world."""
    from pipeline.data.sources import ShardSet
    from pipeline.eval.risks import check_vocabularies, heldout_prompts, risks
    from pipeline.model import load_model
    from pipeline.parallel import ParallelContext

    if prompts < 1:
        raise RiskError(f"--prompts: expected at least 1, got {prompts}")
    manifest = ShardSet(tokens).manifest
    ctx = ParallelContext.from_env(tp, backend)
    try:
        compute = ComputeConfig(dtype=dtype, vocab_multiple=vocab_multiple)
        with tempfile.TemporaryDirectory(prefix="distill-eval-") as scratch:
            models = {role: load_model(model_folder(path, Path(scratch), role), ctx, compute).eval()
                      for role, path in (("student", student), ("teacher", teacher))}
        for model in models.values():
            model.requires_grad_(False)
        vocab = models["student"].model_config.vocab_size
        check_vocabularies(vocab, models["teacher"].model_config.vocab_size, student=student, teacher=teacher)
        if manifest.vocab_size > vocab:
            raise RiskError(f"{tokens}: token ids up to {manifest.vocab_size} but the models score {vocab}")
        mine, keys = heldout_prompts(tokens, prompts, prompt_len, rank=ctx.dp_rank, size=ctx.dp_size)
        out = risks(models["student"], models["teacher"], mine, keys, sampling, vocab_size=vocab,
                    eos_id=manifest.eos_id, seed=seed, group=ctx.tp_group, dp_group=ctx.dp_group)
    finally:
        ctx.destroy()
    if ctx.rank != 0:
        return None
    return {**out, "student": student, "teacher": teacher, "tokens": tokens, "prompts": prompts,
            "prompt_len": prompt_len, "seed": seed, "sampling": config_to_dict(sampling)}

"""A trainer checkpoint (DeepSpeed ZeRO-3, any tp × dp layout) as a Hugging Face folder, offline.

`export_checkpoint(checkpoint, out)` runs in one process without torch.distributed: it finds the tag
folder (from a run folder, its checkpoints/ folder with `latest`, or the tag folder itself), reads the
model config and layout from `run.json`, rebuilds each TP rank's megatron parameters from the ZeRO-3
partitions of its data-parallel ranks with DeepSpeed's own `zero_to_fp32`, joins the TP shards into
Hugging Face tensors with the same mapping the distributed import and export use (`layout.py`), and
writes them with `write_hf_folder` (config.json, the run's tokenizer when it still exists, atomic).

The weights exported are the fp32 master weights of the optimizer files, so a bf16 run exports fp32.

Design choice: DeepSpeed's consolidation rather than our own reading of its flat partitions, so a
change of its checkpoint format stays its problem. It globs every `*_optim_states.pt` of a folder as
one data-parallel group, so each TP rank gets a temporary folder of symlinks to its own files renamed
`mp_rank_00`. Its lazy mode memory-maps the optimizer files and returns one pseudo-tensor per
parameter, so memory holds one parameter's TP shards at a time (plus the OS page cache of the maps);
the cost is that every rank's small model-states file is read whole, and DeepSpeed's prints and
progress bars are silenced (its errors are re-raised as CheckpointError naming the folder).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from pipeline.config import ComputeConfig, ModelConfig, from_dict
from pipeline.model.errors import CheckpointError
from pipeline.model.hf_io import refuse_existing, write_hf_folder
from pipeline.model.layout import hf_from_shards, hf_shapes, tensor_rules
from pipeline.parallel import pad_vocab_size
from pipeline.train.checkpoints import LATEST, RUN_FILE

# DeepSpeed 0.19.8 names (runtime/engine.py `_get_ckpt_name`, `_get_rank_zero_ckpt_name`); the optimizer
# file of a run with bf16 enabled starts with "bf16_". The zero_pp_rank number is the data-parallel rank.
MODEL_FILE = "zero_pp_rank_{dp}_mp_rank_{tp:02d}_model_states.pt"
OPTIM_FILE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def resolve_tag_folder(checkpoint: str | Path) -> Path:
    """The tag folder of a run folder, a checkpoints folder (its `latest`) or a tag folder itself."""
    path = Path(checkpoint)
    if (path / RUN_FILE).is_file():
        return path
    for folder in (path, path / "checkpoints"):
        latest = folder / LATEST
        if latest.is_file():
            tag = latest.read_text().strip()
            tag_folder = folder / tag
            if not tag or not (tag_folder / RUN_FILE).is_file():
                raise CheckpointError(f"{latest}: names checkpoint {tag!r}, but {tag_folder / RUN_FILE} does not "
                                      f"exist (deleted, or the save did not finish)")
            return tag_folder
    raise CheckpointError(f"{path}: not a trainer checkpoint; expected a run folder (with checkpoints/{LATEST}), "
                          f"a checkpoints folder (with {LATEST}) or a checkpoint tag folder (with {RUN_FILE})")


def read_run(tag_folder: Path) -> tuple[ModelConfig, dict, dict]:
    """(model config, layout {world, tp, dp}, the whole run.json) of a tag folder."""
    file = tag_folder / RUN_FILE
    try:
        run = json.loads(file.read_text())
        cfg = from_dict(ModelConfig, {k: v for k, v in run["config"]["model"].items() if k != "init"})
        layout = {key: int(run["layout"][key]) for key in ("world", "tp", "dp")}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{file}: expected JSON with config.model and layout.world/tp/dp as the trainer "
                              f"writes it ({type(err).__name__}: {err})") from None
    if layout["tp"] < 1 or layout["dp"] < 1 or layout["tp"] * layout["dp"] != layout["world"]:
        raise CheckpointError(f"{file}: layout {layout} is inconsistent (expected world = tp × dp ≥ 1)")
    return cfg, layout, run


def rank_files(tag_folder: Path, tp: int, dp: int) -> dict[int, list[tuple[Path, Path]]]:
    """(model-states file, optimizer file) of every data-parallel rank, per TP rank; CheckpointError if one is
    missing."""
    optim = {}
    for file in tag_folder.iterdir():
        match = OPTIM_FILE.match(file.name)
        if match:
            optim[(int(match[3]), int(match[2]))] = file
    files: dict[int, list[tuple[Path, Path]]] = {}
    for tp_rank in range(tp):
        files[tp_rank] = []
        for dp_rank in range(dp):
            model = tag_folder / MODEL_FILE.format(dp=dp_rank, tp=tp_rank)
            if not model.is_file():
                raise CheckpointError(f"{model}: missing (tp={tp} × dp={dp} checkpoint, tp rank {tp_rank}, "
                                      f"dp rank {dp_rank}); the save did not finish on every rank")
            if (tp_rank, dp_rank) not in optim:
                name = MODEL_FILE.format(dp=dp_rank, tp=tp_rank).replace("model_states", "optim_states")
                raise CheckpointError(f"{tag_folder / name}: missing (tp={tp} × dp={dp} checkpoint, tp rank "
                                      f"{tp_rank}, dp rank {dp_rank}); the save did not finish on every rank")
            files[tp_rank].append((model, optim.pop((tp_rank, dp_rank))))
    if optim:
        extra = sorted(path.name for path in optim.values())
        raise CheckpointError(f"{tag_folder}: optimizer files {extra[:4]} beyond the tp={tp} × dp={dp} layout "
                              f"of {RUN_FILE}")
    return files


def _tp_rank_state(files: list[tuple[Path, Path]], scratch: Path, tp_rank: int) -> dict:
    """One TP rank's parameters as zero_to_fp32 pseudo-tensors (`.contiguous()` reads one), by megatron name."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading files needs no device; DeepSpeed would warn guessing
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = f"tp_rank_{tp_rank:02d}"
    (scratch / tag).mkdir()
    for dp_rank, (model, optim) in enumerate(files):
        os.symlink(model.resolve(), scratch / tag / MODEL_FILE.format(dp=dp_rank, tp=0))
        os.symlink(optim.resolve(), scratch / tag / f"zero_pp_rank_{dp_rank}_mp_rank_00_optim_states.pt")
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(str(scratch), tag=tag, lazy_mode=True)
    except Exception as err:  # any failure to read DeepSpeed's files means a damaged checkpoint
        raise CheckpointError(f"{files[0][0].parent}: DeepSpeed cannot consolidate the ZeRO-3 files of tp rank "
                              f"{tp_rank} ({type(err).__name__}: {err})") from err


def _materialize(states: list[dict], name: str, tag_folder: Path) -> list[Tensor]:
    if name not in states[0]:
        raise CheckpointError(f"{tag_folder}: parameter {name!r} is not in the checkpoint (its model differs "
                              f"from {RUN_FILE}'s config.model)")
    return [state[name].contiguous() for state in states]


def hf_tensors(states: list[dict], cfg: ModelConfig, padded_vocab: int, tag_folder: Path,
               progress: bool = False) -> Iterator[tuple[str, Tensor]]:
    """HF-named tensors from every TP rank's lazy state, one parameter at a time, shapes checked."""
    from tqdm import tqdm

    expected = hf_shapes(cfg)
    rules = tensor_rules(cfg)
    for rule in tqdm(rules, desc="export", unit="tensor", disable=not progress):
        shards = _materialize(states, rule.megatron, tag_folder)
        if rule.split == "vocab" and any(s.shape[0] != padded_vocab // len(states) for s in shards):
            raise CheckpointError(f"{tag_folder}: {rule.megatron} has {[s.shape[0] for s in shards]} rows per tp "
                                  f"rank, expected {padded_vocab // len(states)} (vocab {cfg.vocab_size} padded to "
                                  f"{padded_vocab})")
        for name, tensor in hf_from_shards(rule, shards, cfg).items():
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(f"{tag_folder}: {rule.megatron} gives {name} of shape {list(tensor.shape)}, "
                                      f"expected {list(expected[name])} from {RUN_FILE}'s config.model")
            yield name, tensor.to(torch.float32).contiguous()


def _tokenizer(run: dict, tag_folder: Path) -> Path | None:
    source = str(run.get("config", {}).get("data", {}).get("tokenizer") or "")
    if not source:
        return None
    if not Path(source).exists():
        warnings.warn(f"{tag_folder / RUN_FILE}: the run's tokenizer {source} no longer exists; exporting "
                      f"without tokenizer files", stacklevel=3)
        return None
    return Path(source)


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False,
                      progress: bool = True) -> Path:
    """Write the trainer checkpoint `checkpoint` as a Hugging Face folder `out`; returns `out`.

    Refuses an existing non-empty `out` unless `overwrite`. One process, no torch.distributed.
    """
    refuse_existing(out, overwrite)
    tag_folder = resolve_tag_folder(checkpoint)
    cfg, layout, run = read_run(tag_folder)
    files = rank_files(tag_folder, layout["tp"], layout["dp"])
    multiple = int(run["config"].get("compute", {}).get("vocab_multiple", ComputeConfig().vocab_multiple))
    padded_vocab = pad_vocab_size(cfg.vocab_size, layout["tp"], multiple)
    with tempfile.TemporaryDirectory(prefix="export-zero3-") as scratch:
        states = [_tp_rank_state(files[r], Path(scratch), r) for r in range(layout["tp"])]
        tensors = hf_tensors(states, cfg, padded_vocab, tag_folder, progress)
        return write_hf_folder(tensors, cfg, out, tokenizer=_tokenizer(run, tag_folder))

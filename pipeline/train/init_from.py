"""`model.init`: a student that starts from existing weights (a Hugging Face folder or a TP checkpoint).

`resolve_init(cfg)` runs before anything is built and fills the model section from the checkpoint: a field
left at its default takes the checkpoint's value, a field set to anything else must equal it (a TrainError
names the field and both values), so the resolved config a run writes (run_dir/config.yaml, run.json) holds
the architecture it trains, and continued pretraining of an existing model is the one line `model.init`.
A run that resumes from its own run_dir/checkpoints/latest ignores `init`: its defaults come from the model
that checkpoint recorded, and its weights from the checkpoint.

`fill_from_init(model, path, ctx)` writes the weights into a model built without initialisation inside
`deepspeed.zero.Init`, through `layout.fill_from_reader`: one parameter gathered at a time, each TP rank
reading only its slices of a Hugging Face folder (lazily, `SafetensorsFolder`). A TP checkpoint is read at
any tp: each Hugging Face tensor is joined from the rank files (`hf_from_shards`) and then sliced for this
run's layout.

Design choice: one reader interface (Hugging Face names and slices) for both formats, so the import is the
mapping that `load_hf` and the tests already check; the cost is that a TP checkpoint is read whole tensor
by whole tensor on every rank (one parameter at a time, never the model), even when its tp is the run's.
"""
from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional

from safetensors import safe_open
from torch import Tensor

from pipeline.config import ModelConfig, StudentModelConfig, TrainConfig, from_dict
from pipeline.model.checkpoint_files import CheckpointError, SafetensorsFolder
from pipeline.model.hf_config import model_config_from_hf
from pipeline.model.hf_io import check_checkpoint
from pipeline.model.layout import fill_from_reader, hf_from_shards, tensor_rules
from pipeline.model.tp_checkpoint import is_tp_checkpoint, rank_file, read_layout
from pipeline.train.errors import TrainError

ARCHITECTURE_FIELDS = tuple(spec.name for spec in fields(ModelConfig))


def checkpoint_model_config(path: str | Path) -> ModelConfig:
    """The architecture of a Hugging Face folder or TP checkpoint; TrainError naming `model.init` if neither."""
    path = Path(path)
    if not path.is_dir():
        raise TrainError(f"model.init={path}: not a folder (expected a Hugging Face folder or a TP checkpoint)")
    try:
        return read_layout(path)[0] if is_tp_checkpoint(path) else model_config_from_hf(path)
    except CheckpointError as err:
        raise TrainError(f"model.init={path}: {err}") from None


def resolve_init(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its model section completed from model.init (or, on resume, from the run's own checkpoint)."""
    if not cfg.model.init:
        return cfg
    recorded = _resumed_model(Path(cfg.run_dir)) if cfg.run_dir else None
    source, where = (recorded, "the run's own checkpoint") if recorded is not None else \
        (checkpoint_model_config(cfg.model.init), f"model.init={cfg.model.init}")
    default = StudentModelConfig()
    values = {}
    for name in ARCHITECTURE_FIELDS:
        mine, theirs = getattr(cfg.model, name), getattr(source, name)
        if mine != getattr(default, name) and mine != theirs:
            raise TrainError(f"model.{name}={mine!r} but {where} has {name}={theirs!r}; remove model.{name} from "
                             f"the config (it is taken from the checkpoint) or set it to {theirs!r}")
        values[name] = theirs
    return replace(cfg, model=StudentModelConfig(**values, init=cfg.model.init))


def _resumed_model(run_dir: Path) -> Optional[ModelConfig]:
    """The model section recorded by run_dir/checkpoints/latest, or None when the run has no checkpoint yet."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    record = run_dir / "checkpoints" / latest.read_text().strip() / "run.json"
    try:
        model = json.loads(record.read_text())["config"]["model"]
        return from_dict(ModelConfig, {k: v for k, v in model.items() if k in ARCHITECTURE_FIELDS})
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the store reports a damaged checkpoint by name when it opens it


def fill_from_init(model, path: str | Path, tp: int, tp_rank: int) -> None:
    """Write the weights of checkpoint `path` into `model` (this TP rank's slices; collective under ZeRO-3)."""
    if is_tp_checkpoint(path):
        reader = TpCheckpointReader(path)
        fill_from_reader(model, reader.read, tp, tp_rank)
        return
    files = SafetensorsFolder(path)
    try:
        check_checkpoint(files, model.model_config)
        fill_from_reader(model, files.read, tp, tp_rank)
    finally:
        files.close()


class TpCheckpointReader:
    """Hugging Face tensors (and their slices) of a TP checkpoint at any tp, joined from its rank files.

    The tensors of one megatron parameter are joined once and kept until another parameter's are read
    (the fused QKV and gate/up parameters are read piece by piece)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.cfg, layout = read_layout(path)
        files = [self.path / rank_file(rank, layout["tp"]) for rank in range(layout["tp"])]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{self.path}: missing rank files {missing}")
        self.handles = [safe_open(str(f), framework="pt") for f in files]
        self.rule_of = {name: rule for rule in tensor_rules(self.cfg) for name in rule.hf}
        self.joined: tuple[str, dict[str, Tensor]] = ("", {})

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, end: int = 0) -> Tensor:
        rule = self.rule_of.get(name)
        if rule is None:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in a model of its model.yaml")
        if self.joined[0] != rule.megatron:
            try:
                shards = [handle.get_tensor(rule.megatron) for handle in self.handles]
            except Exception as err:  # safetensors raises its own error for an absent name
                raise CheckpointError(f"{self.path}: cannot read {rule.megatron!r} from every rank file "
                                      f"({err})") from None
            self.joined = (rule.megatron, hf_from_shards(rule, shards, self.cfg))
        tensor = self.joined[1][name]
        return tensor if dim is None else tensor.narrow(dim, start, end - start)

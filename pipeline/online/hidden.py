"""The intermediate-state loss: chosen teacher and student layers' hidden states, compared where the loss counts.

With `teacher.hidden_weight` > 0 and an online teacher, forward hooks on the megatron-core layers
(`decoder.layers[l - 1]` for layer l, the embedding for layer 0; the output of decoder layer l, before the
final norm for the last one) keep the hidden states `[S, B, H]` of the forwards the step already runs: the
teacher's scoring forward and the student's training forward, and no other (the hooks record only inside
`HiddenLoss.recording()`, so generation and eval forwards pass through). Sequence parallelism is off in this
trainer, so every TP rank holds the full H of every position and computes the same loss; its gradient reaches
the student through megatron's own TP backward, so TP 2 equals TP 1. The loss is `distance(map(student
state), teacher state)` (mse: mean over H of the squared difference; cosine: 1 − cosine similarity), averaged
over the positions the logits loss counts (its loss mask), then over the layer pairs, and added to that loss
times `hidden_weight`.

Design choice: when the widths differ, one learned linear map (teacher H × student H, no bias, shared by every
layer pair, as Minitron does) is a submodule of the student model itself, `hidden_map`, added inside
`deepspeed.zero.Init` after the student's weights are written. So ZeRO-3 partitions it, the optimizer trains
it, and DeepSpeed's checkpoints save and restore it with the student, with no wrapper module renaming every
parameter; every exporter and importer walks the model's tensor rules (`layout.tensor_rules`), which do not
name it, so the Hugging Face export and TP checkpoints never hold it, and `model.init` fills the student
before it exists. It is applied inside the student's forward (in the layer hook), so ZeRO-3 gathers it in
the module order it traces. The costs: H_t × H_s more parameters with their Adam state in every checkpoint;
a checkpoint with a map resumes only a run with the same map (its shape is part of the run identity, so a
changed hidden_weight or teacher is refused by name); and each recorded state `[S, B, H]` of every pair lives
until the micro-batch's backward (teacher states without gradient). Equal widths take no map.
"""
from __future__ import annotations

import contextlib
import dataclasses
import zlib
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import TrainConfig
from pipeline.train.errors import TrainError

MAP_NAME = "hidden_map"
"""The attribute (and parameter-name prefix) of the learned map on the student model."""


class HiddenMap(nn.Module):
    """`x @ weightᵀ`: student hidden states `[..., H_s]` to the teacher's width `[..., H_t]`."""

    def __init__(self, student_width: int, teacher_width: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(teacher_width, student_width, dtype=dtype, device=device))

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.weight)


def teacher_model_config(location: str):
    """The ModelConfig of `teacher.online` (a Hugging Face folder or a TP checkpoint), read from its files."""
    from pipeline.model.checkpoint_files import CheckpointError
    from pipeline.model.hf_config import model_config_from_hf
    from pipeline.model.tp_checkpoint import is_tp_checkpoint, read_layout

    try:
        return read_layout(location)[0] if is_tp_checkpoint(location) else model_config_from_hf(Path(location))
    except (CheckpointError, OSError, ValueError) as err:
        raise TrainError(f"teacher.online={location}: {err}") from None


def map_shape(cfg: TrainConfig) -> Optional[list[int]]:
    """[teacher H, student H] of the learned map this run trains, or None (no intermediate-state loss, or equal
    widths)."""
    if not (cfg.teacher.hidden_weight and cfg.teacher.online):
        return None
    teacher = teacher_model_config(cfg.teacher.online).hidden_size
    return None if teacher == cfg.model.hidden_size else [teacher, cfg.model.hidden_size]


def initial_map(shape: list[int], seed: int) -> Tensor:
    """The map's float32 initial weight: normal(0, 1/H_s), which keeps a state's norm on average; a pure
    function of (seed, shape), so it is the same at every TP and DP size."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(MAP_NAME.encode())) % 2**63)
    return torch.randn(shape, generator=generator) / shape[1] ** 0.5


def attach_map(model, cfg: TrainConfig) -> None:
    """Give the student `model` its learned map (`MAP_NAME`) when the run needs one; call it inside
    `deepspeed.zero.Init`, after the student's weights are written (collective under ZeRO-3)."""
    shape = map_shape(cfg)
    if shape is None:
        return
    from pipeline.model.layout import whole

    reference = model.embedding.word_embeddings.weight
    module = HiddenMap(shape[1], shape[0], reference.dtype, reference.device)
    setattr(model, MAP_NAME, module)
    with whole(module.weight, modify=True), torch.no_grad():
        module.weight.copy_(initial_map(shape, cfg.seed))


def _layers(key: str, chosen: list[int], num_layers: int, who: str) -> list[int]:
    layers = chosen or [num_layers]
    for layer in layers:
        if layer > num_layers:
            raise TrainError(f"{key}: layer {layer} of a {num_layers}-layer {who}; expected 0 (the embedding "
                             f"output) to {num_layers} (the output of decoder layer l, 1-based)")
    return layers


class _Tap:
    """Forward hooks keeping chosen layers' outputs `[S, B, H]` (through `transform`) while `on`."""

    def __init__(self, model, layers: list[int], transform=None):
        self.on, self.states, self.transform = False, {}, transform
        self.handles = [self._module(model, layer).register_forward_hook(self._keeper(layer))
                        for layer in sorted(set(layers))]

    @staticmethod
    def _module(model, layer: int) -> nn.Module:
        return model.embedding if layer == 0 else model.decoder.layers[layer - 1]

    def _keeper(self, layer: int):
        def keep(module, args, output):
            if self.on:
                state = output[0] if isinstance(output, tuple) else output  # a TransformerLayer returns (h, context)
                self.states[layer] = state if self.transform is None else self.transform(state)
        return keep

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def distance(student: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Per position `[...]` of states `[..., H]`, in float32: mse (mean over H of the squared difference) or
    cosine (1 − cosine similarity)."""
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        return (student - teacher).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


class HiddenLoss:
    """Records the chosen states of one micro-batch's teacher and student forwards, and their loss."""

    def __init__(self, cfg: TrainConfig, student, teacher):
        settings = cfg.teacher
        self.weight, self.kind = settings.hidden_weight, settings.hidden_loss
        student_layers = _layers("teacher.student_layers", settings.student_layers, student.model_config.num_layers,
                                 "student")
        teacher_layers = _layers("teacher.teacher_layers", settings.teacher_layers, teacher.model_config.num_layers,
                                 "teacher")
        self.pairs = list(zip(student_layers, teacher_layers))
        width, teacher_width = student.model_config.hidden_size, teacher.model_config.hidden_size
        mapping = getattr(student, MAP_NAME, None)
        if width != teacher_width and mapping is None:
            raise TrainError(f"teacher.hidden_weight: the student's width {width} differs from the teacher's "
                             f"{teacher_width} but the student has no {MAP_NAME} (built without attach_map)")
        self.student = _Tap(student, student_layers, mapping)
        self.teacher = _Tap(teacher, teacher_layers)

    @contextlib.contextmanager
    def recording(self):
        """Record the states of the forwards run inside (one micro-batch's teacher and student forwards)."""
        for tap in (self.student, self.teacher):
            tap.on, tap.states = True, {}
        try:
            yield
        finally:
            self.student.on = self.teacher.on = False

    def loss(self, mask: Tensor) -> Tensor:
        """The recorded micro-batch's loss (float32 scalar, differentiable in the student): the distance averaged
        over the positions of `mask` `[B, S]`, then over the layer pairs. Frees the recorded states."""
        missing = [pair for pair in self.pairs
                   if pair[0] not in self.student.states or pair[1] not in self.teacher.states]
        if missing:
            raise RuntimeError(f"intermediate-state loss: no recorded states for layer pairs {missing}; run the "
                               "teacher's and the student's forward inside recording()")
        weights = mask.to(torch.float32).t()  # [S, B], as the states
        count = weights.sum().clamp_min(1.0)
        total = sum((distance(self.student.states[s], self.teacher.states[t], self.kind) * weights).sum() / count
                    for s, t in self.pairs)
        self.student.states, self.teacher.states = {}, {}
        return total / len(self.pairs)

    def add_to(self, out, mask: Tensor):
        """`distill_loss`'s output with `hidden_weight` × this micro-batch's loss added to its loss and the loss
        itself as `metrics["hidden_loss"]`."""
        hidden = self.loss(mask)
        return dataclasses.replace(out, loss=out.loss + self.weight * hidden,
                                   metrics={**out.metrics, "hidden_loss": hidden.detach()})

    def remove(self) -> None:
        self.student.remove()
        self.teacher.remove()


def hidden_loss_for(cfg: TrainConfig, engine, targets) -> Optional[HiddenLoss]:
    """The run's `HiddenLoss` on the DeepSpeed engine's student and the online teacher, or None when
    teacher.hidden_weight is 0."""
    if not cfg.teacher.hidden_weight:
        return None
    model = getattr(targets, "model", None)
    if model is None:
        raise TrainError("teacher.hidden_weight needs teacher.online: the hidden states come from the online "
                         "teacher's forward")
    return HiddenLoss(cfg, engine.module, model)

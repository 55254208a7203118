"""The student as a DeepSpeed ZeRO-3 engine, and one optimizer step of it.

`build_engine` builds the student with the models package's builder inside `deepspeed.zero.Init`, so
no rank ever holds the whole model: each parameter is partitioned over the data-parallel group as
soon as its module exists, and the seeded initial weights (or, with `model.init`, a checkpoint's, see
init_from.py) are written one gathered parameter at a time (identical at every TP and DP size).
`ParallelContext` is DeepSpeed's `mpu`, so ZeRO shards over the DP group and the TP ranks of a DP group
hold different slices of the same model.

`StudentStep.run` feeds the micro-batches of one optimizer step through forward, `distill_loss` (or, with
loss.fused_output, `distill_linear_loss` inside the output layer: fused_step.py) and DeepSpeed's
backward/step; DeepSpeed averages gradients over micro-batches and DP ranks, clips them, and skips the
update (counting it in `engine.skipped_steps`) when a gradient is not finite.

Only positions that count are trained on and counted in tokens (`loss_positions`: a real label, so a
bestfit sample's padding counts nowhere, and, for a sample with a loss mask such as a generated
sequence's, a position its mask sets; its prompt does not count), and the step's gradient is the mean over
the counted tokens of all its micro-batches and DP ranks: DeepSpeed averages the micro-batch losses (each
a mean over its own counted tokens) with equal weights, so each loss is scaled by its share, count × G ×
dp / total, before backward. When every micro-batch counts as many tokens, every share is exactly 1 and
nothing is scaled. With teacher.hidden_weight, each micro-batch's loss also takes the intermediate-state
loss of `pipeline/online/hidden.py` (whose learned map, when widths differ, is built into the student here).

Design choice: the loss parts and metrics are summed on the device and all-reduced once per step
over the DP group (one small collective), never per micro-batch; the cost is that a console line
reports the average over the step's micro-batches, not the last one. The counted-token total costs one
more scalar all-reduce per step, before the first forward.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.config import TrainConfig
from pipeline.data.dataset import loss_positions
from pipeline.model.builder import build_model, compute_dtype
from pipeline.online.hidden import attach_map, hidden_loss_for
from pipeline.parallel import ParallelContext
from pipeline.train.deepspeed_config import deepspeed_config, lr_scheduler_factory
from pipeline.train.fused_step import output_losses
from pipeline.train.init_from import fill_from_init

PARTS = ("loss", "kd_loss", "ce_loss", "top1_agreement")


def import_deepspeed(ctx: ParallelContext):
    """deepspeed, imported for this process's device (its CPU accelerator off CUDA) and launcher."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if ctx.device.type == "cuda" else "cpu")
    os.environ.setdefault("LOCAL_RANK", str(ctx.local_rank))  # zero.Init reads it; a world of one lacks it
    import deepspeed

    if ctx.device.type == "cpu":
        # DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce (a C++ extension: about 15 s
        # of two cores and a compiler on the PATH) at its first start, and again whenever the venv is reached
        # through another path (a symlinked .venv), its build file naming the path. Its one user is
        # inference_all_reduce, which nothing here calls: ZeRO-3's collectives are torch.distributed's
        # either way. Marked incompatible, it is never built.
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed's ZeRO-3 still calls the collectives torch renamed; torch says so at every call, which
    # buries the console lines of a run under repeated FutureWarnings that only DeepSpeed can act on
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` "
                                              r"is deprecated", category=FutureWarning)
    return deepspeed


def build_engine(cfg: TrainConfig, ctx: ParallelContext, *, init: str = ""):
    """(engine, the DeepSpeed config it runs with) for a new student initialised from `cfg.seed`, or with the
    weights of the checkpoint `init` (see init_from.py; `cfg.model` must already be resolved against it)."""
    deepspeed = import_deepspeed(ctx)
    ds_config = deepspeed_config(cfg, compute_dtype(cfg.compute, ctx.device))
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=ctx, data_parallel_group=ctx.dp_group):
        model = build_model(cfg.model.architecture_config(), cfg.compute, ctx, initialize=not init, seed=cfg.seed)
        if init:
            fill_from_init(model, init, ctx.tp_size, ctx.tp_rank)
        attach_map(model, cfg)  # the intermediate-state loss's learned map, when widths differ (hidden.py)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, mpu=ctx, dist_init_required=False,
                                           lr_scheduler=lr_scheduler_factory(cfg))
    return engine, ds_config


@dataclass
class StepResult:
    """The DP-averaged loss parts and metrics of one optimizer step, and whether it was applied."""

    values: dict
    tokens: int
    skipped: bool
    grad_norm: float
    lr: float


class StudentStep:
    """Runs optimizer steps of `engine` on micro-batches, with teacher targets from `targets` (a cache's reader,
    an online teacher, or none) along the prefixes `prefixes` (a `PrefixSampler`, or None: the data's)."""

    def __init__(self, cfg: TrainConfig, ctx: ParallelContext, engine, targets, prefixes=None):
        self.cfg, self.ctx, self.engine, self.targets, self.prefixes = cfg, ctx, engine, targets, prefixes
        self.common = dict(tp_group=ctx.tp_group, temperature=cfg.loss.temperature, ce_weight=cfg.loss.ce_weight,
                           chunk_size=cfg.loss.chunk_size, vocab_size=cfg.model.vocab_size)
        self._kwargs: dict = {}
        self.loss_kwargs = self.kwargs_for(cfg.loss.divergence)
        self.warmup_kwargs = self.kwargs_for("kl")  # loss.kl_warmup_steps: forward KL first
        self.times: dict = {}
        self.hidden = hidden_loss_for(cfg, engine, targets)  # teacher.hidden_weight: None when 0
        self.parts = PARTS + (("hidden_loss",) if self.hidden is not None else ())

    def kwargs_for(self, divergence: str) -> dict:
        """`distill_loss`'s settings for `divergence` (built once per divergence, not at every step of a phase)."""
        if divergence not in self._kwargs:
            params = dataclasses.replace(self.cfg.loss, divergence=divergence, kl_warmup_steps=0, phases=[])
            self._kwargs[divergence] = dict(divergence=divergence, **self.common, **params.divergence_params())
        return self._kwargs[divergence]

    def step_loss_kwargs(self, step: int | None = None) -> dict:
        """`distill_loss`'s settings for optimizer step `step` (0-based; default the engine's counter): the
        phase's divergence (loss.phases), or forward KL during loss.kl_warmup_steps. Both counters are restored
        on resume, so a resumed run switches at the same step."""
        step = self.engine.global_steps if step is None else step
        if self.cfg.loss.phases:
            return self.kwargs_for(self.cfg.loss.phase_at(step)[0])
        warm = step < self.cfg.loss.kl_warmup_steps
        return self.warmup_kwargs if warm else self.loss_kwargs

    def prepare(self, micro_batches: list, step: int) -> list:
        """The micro-batches the loss reads at `step`: the data's, or with rows continued by the online teacher
        or the student (loss.prefixes, or the phase's); records this rank's decoding time and the generated
        tokens of the whole step (summed over DP ranks: one small all-reduce per generating step)."""
        _, prefixes = self.cfg.loss.phase_at(step)
        self.times = {}
        if self.prefixes is None or not prefixes.generates:
            return micro_batches
        out = self.prefixes.prepare(micro_batches, step, prefixes, self.engine)
        stats = self.prefixes.stats
        self.times = {f"generate_{k}_s": v for k, v in stats.seconds.items()}
        tokens = torch.tensor([float(v) for v in stats.tokens.values()], dtype=torch.float64)
        if self.ctx.dp_size > 1:  # the step's tokens over every DP rank, as data/consumed_tokens counts them
            tokens = tokens.to(self.ctx.device)
            dist.all_reduce(tokens, group=self.ctx.dp_group)
        self.times.update({f"generated_{k}_tokens": float(v) for k, v in zip(stats.tokens, tokens.tolist())})
        return out

    def inputs(self, batch: dict) -> tuple:
        """(inputs [B, S], document ids [B, S] or None, labels [B, S], the mask [B, S] of positions that count)."""
        device = self.ctx.device
        tokens = batch["tokens"].to(device, non_blocking=True)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        mask = loss_positions(batch, inputs.shape[1]).to(device)
        return inputs, self.engine.module.document_ids(batch["segments"], inputs.shape[1]), labels, mask

    def losses(self, batch: dict, calls: list[tuple]) -> tuple[list, Tensor]:
        """(for each `(targets, kwargs)` in `calls`, `distill_loss(logits, targets.targets(batch), labels=...,
        loss_mask=..., **kwargs)`'s output (targets None: no teacher targets), all from one forward; the mask
        [B, S] of positions that count). With loss.fused_output, inside the output layer (fused_step.py)."""
        inputs, documents, labels, mask = self.inputs(batch)
        calls = [(None if targets is None else targets.targets(batch, self.ctx.device),
                  dict(labels=labels, loss_mask=mask, **kwargs)) for targets, kwargs in calls]
        return output_losses(self.engine, inputs, documents, calls, fused=self.cfg.loss.fused_output), mask

    def run(self, micro_batches: list, step: int | None = None) -> StepResult:
        """One optimizer step on `micro_batches` at optimizer step `step` (0-based; default the engine's)."""
        step = self.engine.global_steps if step is None else step
        micro_batches = self.prepare(micro_batches, step)
        sums = torch.zeros(len(self.parts) + 1, dtype=torch.float64, device=self.ctx.device)
        skipped_before, lr = self.engine.skipped_steps, self.engine.get_lr()[0]
        shares, loss_kwargs = self._token_shares(micro_batches), self.step_loss_kwargs(step)
        for batch, share in zip(micro_batches, shares):
            with self.hidden.recording() if self.hidden is not None else contextlib.nullcontext():
                (out,), mask = self.losses(batch, [(self.targets, loss_kwargs)])
            out = out if self.hidden is None else self.hidden.add_to(out, mask)
            self.engine.backward(out.loss if share == 1.0 else out.loss * share)
            self.engine.step()
            count = out.num_tokens
            parts = (out.loss.detach(), out.kd, out.ce, *(out.metrics[name] for name in self.parts[3:]))
            sums += torch.stack([torch.as_tensor(p, dtype=torch.float64, device=sums.device) * count
                                 for p in parts] + [torch.tensor(float(count), dtype=torch.float64,
                                                                 device=sums.device)])
        if self.ctx.dp_size > 1:
            dist.all_reduce(sums, group=self.ctx.dp_group)
        total = float(sums[-1])
        values = {name: float(sums[i]) / max(total, 1.0) for i, name in enumerate(self.parts)}
        norm = self.engine.get_global_grad_norm()
        return StepResult(values, int(total), self.engine.skipped_steps > skipped_before,
                          float("nan") if norm is None else float(norm), lr)

    def _token_shares(self, micro_batches: list) -> list[float]:
        """Each micro-batch's counted-token count (`loss_positions`) × G × dp / the step's total over every
        micro-batch and DP rank: the loss scale that turns DeepSpeed's equal-weight average into a per-token
        mean."""
        counts = [int(loss_positions(b, b["tokens"].shape[1] - 1).sum()) for b in micro_batches]
        total = torch.tensor([float(sum(counts))], dtype=torch.float64, device=self.ctx.device)
        if self.ctx.dp_size > 1:
            dist.all_reduce(total, group=self.ctx.dp_group)
        total = float(total)
        slots = len(micro_batches) * self.ctx.dp_size
        return [count * slots / total if total > 0 else 0.0 for count in counts]

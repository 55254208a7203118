"""The DeepSpeed config of a run, generated from the typed `TrainConfig`, and its learning-rate schedule.

Users never edit DeepSpeed JSON: micro-batch, gradient accumulation, AdamW, clipping and the dtype
come from the config's sections, and `TrainConfig.deepspeed` is merged last, key by key, for the
rare knob this module does not expose (bucket sizes, offload, ...). The merged config is written to
run_dir/deepspeed.json so a run says exactly what DeepSpeed was given.

Design choice: the schedule is ours (linear warmup from lr/warmup to lr, cosine to min_lr at the last
step), passed to DeepSpeed as a `LambdaLR` factory rather than its `WarmupCosineLR`, whose first step
runs at lr 0. DeepSpeed still owns it: it steps it after every applied optimizer step (not after a
skipped, non-finite one) and saves it in its checkpoints. The cost: deepspeed.json does not show the
schedule; it is read from config.yaml beside it (optim.lr, optim.min_lr, optim.warmup_steps, schedule.steps).
"""
from __future__ import annotations

import copy
import math
from functools import partial

import torch

from pipeline.config import TrainConfig


def deepspeed_config(cfg: TrainConfig, dtype: torch.dtype) -> dict:
    """The DeepSpeed config dict for `cfg` with parameters in `dtype` (bf16 on CUDA, fp32 on CPU by default)."""
    optim = cfg.optim
    generated = {
        "train_micro_batch_size_per_gpu": cfg.schedule.micro_batch,
        "gradient_accumulation_steps": cfg.schedule.grad_accumulation,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": [optim.beta1, optim.beta2], "eps": optim.eps,
            "weight_decay": optim.weight_decay, "torch_adam": True}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return merge(generated, cfg.deepspeed)


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in: nested mappings key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def lr_factor(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): (step+1)/warmup during warmup, then a
    cosine from 1 down to `floor` (= min_lr/lr) at the last step `total − 1`."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler_factory(cfg: TrainConfig):
    """What `deepspeed.initialize(lr_scheduler=...)` takes: optimizer → LambdaLR with `lr_factor`."""
    factor = partial(lr_factor, warmup=cfg.optim.warmup_steps, total=cfg.schedule.steps,
                     floor=cfg.optim.min_lr / cfg.optim.lr)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""Vocab-parallel f-divergence distillation losses: the public entry points (logits, or hidden states and the output weight fused) and target kinds."""
from pipeline.losses.api import DistillOutput, distill_loss
from pipeline.losses.divergences import DIVERGENCES, LOGP_FLOOR, LossInputError
from pipeline.losses.linear import distill_linear_loss
from pipeline.losses.targets import DenseTargets, SampledTargets, SparseTargets

__all__ = ["distill_loss", "distill_linear_loss", "DistillOutput", "DenseTargets", "SparseTargets", "SampledTargets",
           "DIVERGENCES", "LOGP_FLOOR", "LossInputError"]

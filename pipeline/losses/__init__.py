"""Vocab-parallel f-divergence distillation losses: the entry points (on logits, or fused with the output
layer on hidden states and its weight) and the target kinds."""
from pipeline.losses.api import DistillOutput, distill_loss
from pipeline.losses.divergences import DIVERGENCES, LOGP_FLOOR, LossInputError
from pipeline.losses.linear import distill_linear_loss
from pipeline.losses.targets import DenseTargets, SampledTargets, SparseTargets

__all__ = ["distill_loss", "distill_linear_loss", "DistillOutput", "DenseTargets", "SparseTargets", "SampledTargets",
           "DIVERGENCES", "LOGP_FLOOR", "LossInputError"]

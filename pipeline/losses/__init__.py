"""Vocab-parallel f-divergence distillation losses: the public entry point and target kinds."""
from pipeline.losses.api import DistillOutput, distill_loss
from pipeline.losses.divergences import DIVERGENCES, LOGP_FLOOR, LossInputError
from pipeline.losses.targets import DenseTargets, SampledTargets, SparseTargets

__all__ = ["distill_loss", "DistillOutput", "DenseTargets", "SparseTargets", "SampledTargets",
           "DIVERGENCES", "LOGP_FLOOR", "LossInputError"]

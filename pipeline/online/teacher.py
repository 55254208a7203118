"""The online teacher: a frozen model beside the student whose logits are the loss's dense targets.

`OnlineTeacher` loads `teacher.online` (a Hugging Face folder or a TP checkpoint) once per run, at the
student's TP layout and vocabulary padding, so TP rank r of the teacher holds the vocabulary slice TP rank
r of the student scores and `distill_loss` compares them without gathering anything. It is inference
only: no gradient, no optimizer state, not partitioned by ZeRO (every DP rank holds its TP slice whole),
in compute.dtype (bf16 on CUDA).

Design choice: the teacher scores each micro-batch just before the student's forward, on the same
tokens, and its logits live until that micro-batch's loss is computed. The cost is one teacher forward
per micro-batch and one more logits-sized tensor (the teacher's `[B, S, Vl]`) at the peak of the step;
a sparse cache trades that for disk and a coarser target.
"""
from __future__ import annotations

import time

import torch

from pipeline.config import TrainConfig
from pipeline.losses import DenseTargets
from pipeline.parallel import ParallelContext
from pipeline.train.errors import TrainError


class OnlineTeacher:
    """`targets(batch, device)`, like a cache's reader, but computed now by the teacher model."""

    def __init__(self, cfg: TrainConfig, ctx: ParallelContext):
        from pipeline.model import load_model

        self.location = cfg.teacher.online
        self.temperature = cfg.loss.temperature
        try:
            model = load_model(self.location, ctx, cfg.compute)
        except FileNotFoundError as err:
            raise TrainError(f"teacher.online={self.location}: {err}") from None
        self.model = model.eval().requires_grad_(False)
        vocab = self.model.model_config.vocab_size
        if vocab != cfg.model.vocab_size:
            raise TrainError(f"teacher.online={self.location} scores {vocab} ids but model.vocab_size is "
                             f"{cfg.model.vocab_size}; an online teacher's logits are compared slice by slice with "
                             f"the student's, so both need one tokenizer and vocabulary (set model.vocab_size="
                             f"{vocab} if the tokenizer is the same)")
        self.seconds = 0.0  # teacher forward time since the last `take_seconds`

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor, document_ids) -> torch.Tensor:
        """The teacher's `[B, S, Vl]` logits of this rank's vocabulary slice for `inputs` `[B, S]`."""
        start = time.perf_counter()
        out = self.model(inputs, document_ids=document_ids)
        self.seconds += time.perf_counter() - start
        return out

    def targets(self, batch: dict, device: torch.device) -> DenseTargets:
        """Dense targets for a micro-batch (its inputs are `tokens[:, :-1]`, as the student's)."""
        inputs = batch["tokens"][:, :-1].to(device, non_blocking=True)
        documents = self.model.document_ids(batch["segments"], inputs.shape[1])
        return DenseTargets(self.logits(inputs, documents))

    def take_seconds(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

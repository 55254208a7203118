"""The student's losses from one forward, through its logits or inside its output layer (`loss.fused_output`).

`output_losses` returns what `distill_loss(logits, targets, **kwargs)` returns for each requested loss.
Unfused, the model computes its `[B, S, Vl]` logits and each loss reads them. Fused, the model's output
layer hands its hidden states and weight slice to `distill_linear_loss` instead (`LlamaGPT.forward`'s
`output_fn`), so the logits and their gradient never exist; the trainer and the evaluator share this one
switch.

Design choice: the fused losses run inside the output layer's forward, so ZeRO-3's hooks on that module
gather its weight (or the tied embedding's) and handle its gradient exactly as for the logits; the cost is
that the loss tensors must leave the model as its output (the `DistillOutput`s are rebuilt around them),
else ZeRO-3's backward hooks on the output layer would not run. megatron's hidden states are `[S, B, H]`
(sequence first); they are transposed to `[B, S, H]` so labels, masks and teacher targets keep the trainer's
`[B, S]` layout (`distill_linear_loss` copies them into rows, `[N, H]`: small beside `[N, Vl]`).
"""
from __future__ import annotations

import dataclasses

from pipeline.losses import DistillOutput, distill_linear_loss, distill_loss


def output_losses(engine, inputs, documents, calls: list[tuple], *, fused: bool) -> list[DistillOutput]:
    """One forward of `engine` on `inputs` `[B, S]` (with document ids `documents` or None) and, for each
    `(targets, kwargs)` in `calls`, `distill_loss(logits, targets, **kwargs)`'s output; with `fused`,
    `distill_linear_loss` on the output layer's hidden states and weight slice instead."""
    if not fused:
        logits = engine(inputs, document_ids=documents)
        return [distill_loss(logits, targets, **kwargs) for targets, kwargs in calls]
    outs: list[DistillOutput] = []

    def in_output_layer(hidden, weight):
        rows = hidden.transpose(0, 1)  # [S, B, H] -> [B, S, H]
        outs.extend(distill_linear_loss(rows, weight, targets, **kwargs) for targets, kwargs in calls)
        return [out.loss for out in outs]

    losses = engine(inputs, document_ids=documents, output_fn=in_output_layer)
    return [dataclasses.replace(out, loss=loss) for out, loss in zip(outs, losses, strict=True)]

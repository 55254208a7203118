"""`distill_linear_loss`: the output layer fused into `distill_loss`, so the logits never exist whole.

It takes this rank's hidden states [N, H] (or [B, S, H]) and its vocabulary slice of the output
weight [Vl, H], and works in blocks of B token rows: a block's logits are `h_block @ Wᵀ` (one [B, Vl]
buffer, accumulated in fp32, or float64 for float64 inputs), the dense or sparse chunk kernel of
`distill_loss` turns them, a chunk of rows at a time, into the block's loss sums and logits gradient g,
and g is folded at once into grad_hidden[block] = g·W and grad_W += gᵀ·h_block (both accumulated in
fp32). At temperature 1, g overwrites the logits (both kernels read the logits only before they
write g); at other temperatures it takes a second [B, Vl] buffer. So the only
vocabulary-sized memory is BLOCK_ROWS rows of [·, Vl] buffers and the kernel's chunk temporaries,
whatever N: no [N, Vl] logits, no [N, Vl] gradient, no all-gather of the vocabulary (the collectives are
the chunk kernels' per-row ones). Student logits at the teacher's K ids are read from the block's logits
row, which exists anyway, so they equal the dot products with the K weight rows exactly.

Design choice: blocks are longer than the kernel's chunks (512 rows when g overwrites the logits, else
256; chunks are sized for the kernel's temporaries, at most CHUNK_ROWS unless chunk_size says
otherwise). The three matmuls are what a call costs, and short blocks make them slow: at N = 8192,
H = 1024, V = 32000 on 2 CPU cores the fused loss took 1.37× the unfused one in blocks of the dense
chunk (65 rows), 1.11× in blocks of 256 sparse rows, and 0.98–1.05× now (benchmarks/README.md). The
cost is BLOCK_ROWS·Vl numbers of buffer (262 MB at Vl = 128k), fixed, where the logits grow with N.

Second design choice: the gradients are computed in the forward pass (the default) and backward only
scales them by the incoming gradient (in place, as `distill_loss` does). The alternative,
`recompute=True`, saves nothing but the inputs and repeats every block in backward; it pays the
logits matmul and every exp twice (1.3–1.9× the time of the default in benchmarks/loss.py's
`fused_recompute` rows) and saves the same peak: it only avoids holding grad_hidden [N, H] and the
fp32 grad_W [Vl, H] from forward to backward, which a training step allocates anyway; so
forward-computed gradients are the default.

Costs: grad_W is held in fp32 ([Vl, H] fp32, cast to the weight's dtype at the end); bf16 weights
are copied to fp32 once per pass (another [Vl, H] fp32).
As with a column-parallel output layer, the returned grad_hidden is this rank's part; the caller's
copy-to-tensor-parallel-region (megatron's, before the output layer) sums it over TP ranks.
Ids ≥ vocab_size in the last rank's slice (padding rows of the weight) get no logits and a zero
gradient. Double backward is not supported.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from pipeline.losses.api import DistillOutput, _Plan, build_plan, output
from pipeline.losses.divergences import LossInputError

BLOCK_ROWS = 512
CHUNK_ROWS = 64
"""The kernel's automatic chunk here is at most this many rows: an eighth of a 512-row block."""


class _Fused:
    """One call's blocks: logits per token block, the chunk kernel, and the fold into both gradients."""

    def __init__(self, plan: _Plan, hidden: Tensor, weight: Tensor, block: int):
        self.plan, self.dtype, self.block = plan, plan.settings.dtype, block
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        self.weight = weight[: plan.shard.width]  # padding rows never enter the arithmetic

    def run(self, want_hidden: bool, want_weight: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(sums [3], grad_hidden in the hidden's dtype or None, grad_weight in fp32 or None)."""
        plan, dtype, hidden = self.plan, self.dtype, self.hidden
        w = self.weight.detach().to(dtype)
        rows_total, width = hidden.shape[0], w.shape[0]
        any_grad = want_hidden or want_weight
        grad_h = torch.empty_like(hidden) if want_hidden else None
        grad_w = torch.zeros(self.weight.shape[0], hidden.shape[1], dtype=dtype, device=hidden.device) \
            if want_weight else None
        logits = torch.empty(min(self.block, rows_total), width, dtype=dtype, device=hidden.device)
        grad = (logits if grad_in_place(plan) else torch.empty_like(logits)) if any_grad else None
        total = torch.zeros(3, dtype=dtype, device=hidden.device)
        for lo in range(0, rows_total, self.block):
            rows = slice(lo, min(lo + self.block, rows_total))
            h = hidden[rows].detach().to(dtype)
            x = torch.mm(h, w.t(), out=logits[: h.shape[0]])
            g = None if grad is None else grad[: h.shape[0]]
            for sub in range(0, h.shape[0], plan.chunk):  # the kernel's temporaries stay chunk-sized
                part = slice(sub, sub + plan.chunk)
                total += plan.chunk_sums(x[part], None if g is None else g[part],
                                         slice(lo + sub, min(lo + sub + plan.chunk, rows.stop)))
            if grad_h is not None:
                grad_h[rows] = g @ w
            if grad_w is not None:
                grad_w.addmm_(g.t(), h)
        plan.settings.scratch.clear()
        return total, grad_h, grad_w

    def finish_weight_grad(self, grad_w: Tensor | None, weight: Tensor) -> Tensor | None:
        """The fp32 [width, H] accumulator as a gradient of the full weight (padding rows 0), in its dtype."""
        if grad_w is None:
            return None
        if weight.shape[0] != grad_w.shape[0]:
            grad_w = torch.cat([grad_w, grad_w.new_zeros(weight.shape[0] - grad_w.shape[0], grad_w.shape[1])])
        return grad_w.to(weight.dtype)


class _LinearDistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, plan: _Plan, scale: float, recompute: bool, block: int) -> Tensor:
        fused = _Fused(plan, hidden, weight, block)
        want = (False, False) if recompute else (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        plan.sums, grad_h, grad_w = fused.run(*want)
        ctx.recompute, ctx.plan, ctx.block = recompute, plan if recompute else None, block
        if recompute:
            ctx.save_for_backward(hidden, weight)
        else:
            ctx.save_for_backward(_in_layout_of(hidden, grad_h),
                                  fused.finish_weight_grad(grad_w, weight))
        cfg = plan.settings
        return (cfg.kd_weight * cfg.temperature**2 * plan.sums[0] + cfg.ce_weight * plan.sums[1]) * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        if ctx.recompute:
            hidden, weight = ctx.saved_tensors
            fused = _Fused(ctx.plan, hidden, weight, ctx.block)
            _, grad_h, grad_w = fused.run(ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            grads = [_in_layout_of(hidden, grad_h), fused.finish_weight_grad(grad_w, weight)]
        else:
            grads = list(ctx.saved_tensors)
        if not bool(grad_output == 1):
            for g in grads:
                if g is not None:
                    g.mul_(grad_output.to(g.dtype))
        return grads[0], grads[1], None, None, None, None


def _in_layout_of(hidden: Tensor, rows: Tensor | None) -> Tensor | None:
    """The [N, H] row gradient shaped and strided as `hidden` (a transposed view gets a transposed gradient).

    Autograd's own ops keep a view's layout in its gradient, and megatron relies on it: its TP all-reduce of
    the hidden-state gradient reduces `grad.contiguous()` and returns `grad`, so a gradient that is not
    contiguous in the layer's own [S, B, H] order would silently stay unreduced.
    """
    if rows is None or hidden.is_contiguous():
        return None if rows is None else rows.view(hidden.shape)
    out = torch.empty_like(hidden)  # keeps hidden's strides
    out.copy_(rows.view(hidden.shape))
    return out


def distill_linear_loss(hidden: Tensor, weight: Tensor, targets, *, divergence: str, tp_group=None,
                        temperature: float = 1.0, labels: Tensor | None = None, loss_mask: Tensor | None = None,
                        ce_weight: float = 0.0, chunk_size: int | None = None, vocab_size: int | None = None,
                        recompute: bool = False, block_size: int | None = None,
                        **divergence_params) -> DistillOutput:
    """`distill_loss(hidden @ weight.T, targets, ...)` without materialising the logits.

    hidden: [..., H] final hidden states (the same on every TP rank), any float dtype.
    weight: [Vl, H] this TP rank's contiguous vocabulary slice of the output weight (tied embeddings:
    pass the embedding Parameter itself; its gradient accumulates from both uses).
    recompute: compute the gradients in backward by repeating the blocks instead of in forward.
    block_size: token rows per logits block (its matmuls); None picks `auto_block` rows.
    Every other argument, the result and the metrics are those of `distill_loss`.
    """
    _check_inputs(hidden, weight)
    logits_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    student = torch.empty(tuple(hidden.shape[:-1]) + (weight.shape[0],), dtype=logits_dtype, device="meta")
    plan, count, scale = build_plan(student, hidden.device, targets, divergence=divergence, tp_group=tp_group,
                                    temperature=temperature, labels=labels, loss_mask=loss_mask, ce_weight=ce_weight,
                                    chunk_size=chunk_size, vocab_size=vocab_size, divergence_params=divergence_params)
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise LossInputError(f"block_size: expected None (automatic) or an int ≥ 1, got {block_size!r}")
    block = block_size or auto_block(plan)
    if chunk_size is None:  # the kernel's temporaries (a few [chunk, Vl] for dense targets) stay small
        plan.chunk = min(plan.chunk, CHUNK_ROWS)
    loss = _LinearDistillLoss.apply(hidden, weight, plan, scale, bool(recompute), block)
    return output(loss, plan, count, scale)


def grad_in_place(plan: _Plan) -> bool:
    """Whether a block's logits gradient overwrites its logits: at temperature 1 both kernels read the
    logits only before they write the gradient (sparse.py, dense.py); otherwise the temperature-1 CE
    part reads them after."""
    return plan.settings.temperature == 1.0


def auto_block(plan: _Plan) -> int:
    """Token rows per logits block: BLOCK_ROWS rows of [block, Vl] buffers in all (one buffer when the
    gradient overwrites the logits, else two), and at least one kernel chunk (of a given chunk_size).
    Longer blocks make the per-block matmuls faster (the weight gradient's update gᵀ·h reads and writes
    all of [Vl, H] once per block) at BLOCK_ROWS·Vl numbers of memory, whatever the number of tokens."""
    return max(plan.chunk, BLOCK_ROWS // (1 if grad_in_place(plan) else 2))


def _check_inputs(hidden, weight) -> None:
    for name, value, shape in (("hidden", hidden, "[..., H]"), ("weight", weight, "[Vl, H]")):
        if not isinstance(value, Tensor) or not value.is_floating_point():
            kind = f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
            raise LossInputError(f"{name}: expected a floating-point tensor {shape}, got {kind}")
    if hidden.dim() < 2:
        raise LossInputError(f"hidden: expected shape [..., H] with at least one position, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise LossInputError(f"weight: expected shape [Vl, H] with Vl > 0 and H = hidden's last dim "
                             f"{hidden.shape[-1]}, got {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise LossInputError(f"weight: expected the hidden states' device {hidden.device}, got {weight.device}")

"""This rank's place in the vocabulary split, the per-call settings, and the two collectives used.

Every collective goes through `all_reduce`, which does nothing when there is no tensor-parallel
group (or a group of one), so the single-process path pays for no communication at all. The
vocabulary split is contiguous, as megatron-core's: TP rank r owns ids [r·Vl, (r+1)·Vl); ids at or above the real
vocabulary size are padding and are sliced away before any arithmetic, so they never carry mass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.losses.divergences import Divergence, LossInputError


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(tensor: Tensor, op: str, group) -> Tensor:
    """In-place all-reduce ('sum' or 'max') over `group`; a no-op without a multi-rank group."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return tensor


@dataclass(frozen=True)
class Shard:
    """This rank's vocabulary slice: global id `start` is local column 0; `width` columns are real."""

    group: object
    start: int
    local_size: int
    width: int
    vocab_size: int

    @classmethod
    def of(cls, local_size: int, vocab_size: int | None, group) -> "Shard":
        tp = group_size(group)
        rank = dist.get_rank(group) if tp > 1 else 0
        padded = local_size * tp
        vocab = padded if vocab_size is None else int(vocab_size)
        if not 0 < vocab <= padded:
            raise LossInputError(f"vocab_size: expected 0 < vocab_size ≤ Vl·tp = {local_size}·{tp} = {padded}, got {vocab}")
        start = rank * local_size
        return cls(group, start, local_size, max(0, min(local_size, vocab - start)), vocab)

    def check_agreement(self, numbers: list[int]) -> None:
        """All TP ranks must call with the same shapes, or the collectives would pair up wrongly."""
        if group_size(self.group) == 1:
            return
        both = torch.tensor(numbers + [-n for n in numbers], dtype=torch.float64)
        all_reduce(both, "max", self.group)
        highs, lows = both[: len(numbers)], -both[len(numbers):]
        if not torch.equal(highs, lows):
            raise LossInputError(f"tensor-parallel ranks disagree on (tokens, Vl, K, vocab_size): "
                                 f"this rank has {numbers}, the group spans {lows.tolist()}..{highs.tolist()}")


class Scratch:
    """Chunk-sized buffers reused by every chunk of one call.

    A fresh vocabulary-sized temporary per chunk costs more than its arithmetic on CPU (the allocator
    returns large blocks to the OS, so every chunk page-faults them in again); reusing them keeps the
    same peak (one chunk's temporaries) and pays that once per call. `clear` frees them.
    """

    def __init__(self):
        self.buffers: dict[str, Tensor] = {}

    def get(self, name: str, like: Tensor, dtype: torch.dtype) -> Tensor:
        """An uninitialised [rows, cols] tensor of `dtype` on `like`'s device and of its 2-D shape."""
        rows, cols = like.shape
        buf = self.buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype \
                or buf.device != like.device:
            buf = self.buffers[name] = torch.empty(rows, cols, dtype=dtype, device=like.device)
        return buf[:rows]

    def clear(self) -> None:
        self.buffers.clear()


@dataclass(frozen=True)
class Settings:
    """The per-call constants every chunk needs (and the call's reusable chunk buffers)."""

    divergence: Divergence
    params: dict
    temperature: float
    kd_weight: float
    ce_weight: float
    dtype: torch.dtype
    scratch: Scratch = field(default_factory=Scratch, compare=False, repr=False)

    @property
    def has_divergence(self) -> bool:
        """Whether a divergence is computed (its value is reported even when its weight is 0)."""
        return self.divergence.formula is not None


def row_max(values: Tensor) -> Tensor:
    """Max over the last dim; −inf for rows of an empty shard (all of it padding)."""
    if values.shape[-1] == 0:
        return torch.full(values.shape[:-1], float("-inf"), dtype=values.dtype, device=values.device)
    return values.amax(dim=-1)


def gather_owned(values: Tensor, ids: Tensor, shard: Shard) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """values[row, id − start] for the ids this rank owns (0 elsewhere), and where they sit.

    Returns the [C, K] tensor and (rows, slots, cols): row and slot in `ids`, column in `values`.
    """
    owned = (ids >= shard.start) & (ids < shard.start + shard.width)
    rows, slots = owned.nonzero(as_tuple=True)
    cols = ids[rows, slots].long() - shard.start
    picked = torch.zeros(ids.shape, dtype=values.dtype, device=values.device)
    picked[rows, slots] = values[rows, cols]
    return picked, (rows, slots, cols)


def label_logits(x: Tensor, labels: Tensor, shard: Shard) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """The logit at each row's label where this rank owns it (0 elsewhere), and its (rows, cols)."""
    picked, (rows, _, cols) = gather_owned(x, labels.unsqueeze(-1), shard)
    return picked.squeeze(-1), (rows, cols)

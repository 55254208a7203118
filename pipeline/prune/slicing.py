"""Which teacher indices the student keeps, and the teacher's tensors cut down to them.

Every choice keeps the top-k by score, ties to the lower index, then sorts the kept indices ascending, so
the student's channels, heads and layers stay in the teacher's order and keeping everything is the
identity. Heads are chosen by key/value group (a group's score is the mean of its query heads' scores),
so every kept query head keeps the key/value head it shares. Hidden channels are cut from every tensor
that touches the residual stream (embeddings, every norm, q/k/v inputs, o_proj outputs, MLP inputs and
outputs, lm_head) with the same indices.

Design choice: the cut is `index_select` on the stored Hugging Face tensors, one tensor at a time, in
their stored dtype, so memory holds one teacher tensor at once and an identity prune copies bits; the
cost is that the pruned model is not re-scaled in any way (RMSNorm over fewer channels sees other
statistics; distillation is what recovers that).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor

from pipeline.config import ModelConfig


def top_k(scores: Tensor, k: int) -> list[int]:
    """The indices of the `k` highest scores (ties: lower index first), ascending."""
    order = torch.argsort(-scores.double(), stable=True)[:k]
    return sorted(int(i) for i in order)


@dataclass
class Selection:
    """What the student keeps of the teacher; `layers[j]` is the teacher layer behind student layer j."""

    layers: list[int]
    hidden: list[int]
    mlp: list[list[int]]         # per student layer: kept intermediate channels
    kv_groups: list[list[int]]   # per student layer: kept key/value heads (groups)

    def query_heads(self, j: int, per_group: int) -> list[int]:
        return [g * per_group + h for g in self.kv_groups[j] for h in range(per_group)]


def group_scores(head_scores: Tensor, kv_heads: int) -> Tensor:
    """Per key/value group: the mean score of its query heads (consecutive, as in Hugging Face's layout)."""
    return head_scores.reshape(kv_heads, -1).mean(dim=1)


def _rows(tensor: Tensor, index: list[int]) -> Tensor:
    return tensor.index_select(0, torch.tensor(index, dtype=torch.long))


def _cols(tensor: Tensor, index: list[int]) -> Tensor:
    return tensor.index_select(1, torch.tensor(index, dtype=torch.long))


def _head_rows(index: list[int], head_size: int) -> list[int]:
    return [h * head_size + d for h in index for d in range(head_size)]


def cut_tensor(name: str, tensor: Tensor, j: int, sel: Selection, teacher: ModelConfig) -> Tensor:
    """Student layer `j`'s (or a global) tensor `name` (Hugging Face name suffix rules) cut from the teacher's."""
    D, per_group = teacher.head_size, teacher.num_heads // teacher.kv_heads
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return _cols(tensor, sel.hidden)
    if name.endswith("norm.weight"):
        return _rows(tensor, sel.hidden)
    if ".q_proj." in name or ".k_proj." in name or ".v_proj." in name:
        heads = sel.query_heads(j, per_group) if ".q_proj." in name else sel.kv_groups[j]
        out = _rows(tensor, _head_rows(heads, D))
        return out if out.dim() == 1 else _cols(out, sel.hidden)
    if name.endswith("o_proj.weight"):
        return _cols(_rows(tensor, sel.hidden), _head_rows(sel.query_heads(j, per_group), D))
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return _cols(_rows(tensor, sel.mlp[j]), sel.hidden)
    if name.endswith("down_proj.weight"):
        return _cols(_rows(tensor, sel.hidden), sel.mlp[j])
    raise ValueError(f"no pruning rule for tensor {name!r}")


def student_tensors(teacher_tensors: Iterable[tuple[str, Tensor]], sel: Selection,
                    teacher: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """(student name, tensor) for every teacher tensor the student keeps, renumbering the kept layers."""
    new_index = {old: new for new, old in enumerate(sel.layers)}
    for name, tensor in teacher_tensors:
        if name.startswith("model.layers."):
            old = int(name.split(".")[2])
            if old not in new_index:
                continue
            j = new_index[old]
            name = f"model.layers.{j}." + name.split(".", 3)[3]
        else:
            j = -1
        yield name, cut_tensor(name, tensor, j, sel, teacher).contiguous()

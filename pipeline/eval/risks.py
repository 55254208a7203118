"""The likelihood and coverage risks of f-DISTILL (Table 3): each model scores the other's samples.

For held-out prompts x (the first `prompt_len` tokens of held-out samples):

- likelihood risk  R_llh = mean over the STUDENT's sampled continuations y of −log p_teacher(y_t | x, y_<t):
  high when the student puts mass where the teacher has none (mode averaging);
- coverage risk    R_cvg = mean over the TEACHER's sampled continuations y of −log q_student(y_t | x, y_<t):
  high when the student misses modes the teacher covers (mode collapse).

Both are pooled means over every generated token (EOS included where a row stopped there), natural
log, and sums are all-reduced over the DP group when one is given, so the figure is the same whatever
the DP split of the prompts. Generation is `pipeline.generate.generate`, seeded by (seed, sample key),
so a rerun, another TP size or another DP split gives the same samples; both models draw with the
same seed, so swapping student and teacher swaps R_llh and R_cvg exactly.

Scoring (`score_continuations`) runs one full forward per batch of prompt + continuation rows (right
padded: causal attention keeps padding out of every real position) and takes −log softmax at each
continuation token from the vocabulary-parallel logits: one MAX and two SUM all-reduces over the TP
group of [B, L] values, never the vocabulary, accumulated in fp32.

Design choice: the continuations are generated first and scored afterwards by a separate full forward,
rather than scoring the other model incrementally while generating; the cost is one extra forward of
each sequence (cheap next to the token-by-token generation), in exchange for one scoring path shared
with every caller and no coupling of two KV caches. Memory: a scoring batch holds B × L × V/tp fp32
logits (`batch` bounds B).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.config import SamplingConfig
from pipeline.eval.errors import RiskError
from pipeline.generate.decode import Generation, for_generation, generate
from pipeline.losses.shard import Shard, all_reduce, label_logits, row_max

SCORE_BATCH = 8  # rows per scoring forward


def heldout_prompts(location: str, count: int, prompt_len: int, *, rank: int = 0,
                    size: int = 1) -> tuple[list[Tensor], list[str]]:
    """The first `prompt_len` tokens of the first `count` samples of a token-shard folder (manifest order)
    and their keys; this DP rank's share (`rank`, `rank + size`, … of them)."""
    from pipeline.data.shards import ShardReader
    from pipeline.data.sources import ShardSet
    from tokenization.format import decode_sample

    shards = ShardSet(location)
    manifest = shards.manifest
    total = sum(entry.samples for entry in manifest.shards)
    if count > total:
        raise RiskError(f"{location}: {count} risk prompts asked for, but the folder holds {total} samples")
    if not 0 < prompt_len <= manifest.seq_len:
        raise RiskError(f"prompt_len={prompt_len}: expected 1 ≤ prompt_len ≤ the samples' length "
                        f"{manifest.seq_len} in {location}")
    prompts, keys, index = [], [], 0
    for shard, entry in enumerate(manifest.shards):
        if index >= count:
            break
        reader = ShardReader(shards.url(shard), expected=entry.samples, where=shards.where(shard))
        try:
            for raw in reader.take(min(entry.samples, count - index)):
                tokens, segments = decode_sample(raw, seq_len=manifest.seq_len, dtype=manifest.dtype,
                                                 where=shards.where(shard))
                if int(segments[-1]) < prompt_len:
                    raise RiskError(f"{shards.where(shard)}: sample {raw['__key__']!r} has {int(segments[-1])} "
                                    f"real tokens, fewer than prompt_len={prompt_len}")
                if index % size == rank:
                    prompts.append(torch.from_numpy(tokens[:prompt_len].astype(np.int64)))
                    keys.append(raw["__key__"])
                index += 1
        finally:
            reader.close()
    return prompts, keys


def _continuation_nll(logits: Tensor, labels: Tensor, *, vocab_size: int, group) -> Tensor:
    """[B, L] −log softmax(logits)[label] in fp32, from this rank's vocabulary slice `logits` [B, L, Vl]."""
    shard = Shard.of(logits.shape[-1], vocab_size, group)
    z = logits[..., : shard.width].float().flatten(0, 1)                                       # [B·L, Vl]
    flat = labels.flatten().clamp(0, vocab_size - 1)
    top = all_reduce(row_max(z), "max", group)
    sums = torch.stack([(z - top[:, None]).exp().sum(dim=-1), label_logits(z, flat, shard)[0]], dim=-1)
    sums = all_reduce(sums, "sum", group)
    return (top + sums[:, 0].log() - sums[:, 1]).view(labels.shape)


@torch.no_grad()
def score_continuations(model, prompts: Sequence[Tensor], continuations: Sequence[Tensor], *, vocab_size: int,
                        group=None, batch: int = SCORE_BATCH) -> list[Tensor]:
    """Per-token −log p_model of each continuation after its prompt: one float64 [len] tensor per row.

    `model` is this rank's TP slices (`group` its TP group); every rank of the group must call with the
    same rows and returns the same values. Empty continuations score as empty tensors.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"continuations: expected one per prompt ({len(prompts)}), got {len(continuations)}")
    device = next(model.parameters()).device
    out: list[Tensor] = []
    with for_generation(model) as module:  # a ZeRO-3 engine: gathered once, no per-layer gathers
        was_training = module.training
        module.eval()
        try:
            for start in range(0, len(prompts), batch):
                rows = list(zip(prompts[start: start + batch], continuations[start: start + batch]))
                out += _score_batch(module, rows, device, vocab_size, group)
        finally:
            module.train(was_training)
    return out


def _score_batch(model, rows, device, vocab_size: int, group) -> list[Tensor]:
    width = max(p.numel() + c.numel() for p, c in rows) - 1
    if width < 1 or all(c.numel() == 0 for _, c in rows):
        return [torch.zeros(0, dtype=torch.float64) for _ in rows]
    tokens = torch.zeros(len(rows), width + 1, dtype=torch.int64)
    for row, (prompt, cont) in enumerate(rows):
        sequence = torch.cat([prompt.long().cpu(), cont.long().cpu()])
        tokens[row, : sequence.numel()] = sequence
    tokens = tokens.to(device)
    nll = _continuation_nll(model(tokens[:, :-1]), tokens[:, 1:], vocab_size=vocab_size, group=group).cpu()
    return [nll[row, prompt.numel() - 1: prompt.numel() - 1 + cont.numel()].double()
            for row, (prompt, cont) in enumerate(rows)]


def _pooled(nll: list[Tensor], device, dp_group) -> tuple[float, int]:
    sums = torch.tensor([float(sum(float(t.sum()) for t in nll)), float(sum(t.numel() for t in nll))],
                        dtype=torch.float64, device=device)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(sums, group=dp_group)
    tokens = int(sums[1])
    return (float(sums[0]) / tokens if tokens else float("nan")), tokens


def sample(model, prompts, keys, sampling: SamplingConfig, *, vocab_size: int, eos_id: Optional[int], seed: int,
           group=None) -> Generation:
    """`model`'s continuations of `prompts` as risks draws them (an empty Generation without prompts)."""
    if not prompts:  # a DP rank without a share still takes part in a ZeRO-3 student's collective gather
        with for_generation(model):
            pass
        return Generation([], [])
    return generate(model, prompts, keys, sampling, vocab_size=vocab_size, eos_id=eos_id, seed=seed, group=group)


def risks(student, teacher, prompts: Sequence[Tensor], keys: Sequence[str], sampling: SamplingConfig, *,
          vocab_size: int, eos_id: Optional[int], seed: int, group=None, dp_group=None,
          teacher_samples: Optional[Generation] = None) -> dict:
    """{r_llh, r_cvg, llh_tokens, cvg_tokens} of `student` against `teacher` on this rank's `prompts`.

    llh_tokens counts the student's generated tokens (R_llh's denominator), cvg_tokens the teacher's.
    `teacher_samples` reuses the teacher's continuations of these prompts (same keys, seed, sampling)
    from an earlier call: the teacher is fixed and its draws are seeded, so they would be the same.
    Collective over `group` (TP) and, for the pooled sums, `dp_group`.
    """
    common = dict(vocab_size=vocab_size, group=group)
    mine = sample(student, prompts, keys, sampling, eos_id=eos_id, seed=seed, **common)
    theirs = teacher_samples if teacher_samples is not None else \
        sample(teacher, prompts, keys, sampling, eos_id=eos_id, seed=seed, **common)
    if len(theirs.tokens) != len(prompts):
        raise ValueError(f"teacher_samples: expected {len(prompts)} rows, got {len(theirs.tokens)}")
    device = next(student.parameters()).device
    r_llh, llh_tokens = _pooled(score_continuations(teacher, prompts, mine.tokens, **common), device, dp_group)
    r_cvg, cvg_tokens = _pooled(score_continuations(student, prompts, theirs.tokens, **common), device, dp_group)
    return {"r_llh": r_llh, "r_cvg": r_cvg, "llh_tokens": llh_tokens, "cvg_tokens": cvg_tokens}


def check_vocabularies(student_vocab: int, teacher_vocab: int, *, student: str, teacher: str) -> None:
    """A RiskError naming both models unless they score the same vocabulary (each scores the other's ids)."""
    if student_vocab != teacher_vocab:
        raise RiskError(f"the student {student} has a vocabulary of {student_vocab} ids but the teacher {teacher} "
                        f"has {teacher_vocab}; risks need one tokenizer (each model scores the other's samples)")

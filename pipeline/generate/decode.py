"""Batched incremental decoding of a `LlamaGPT` at any TP size: prompts in, continuations out.

`Decoder` owns one KV cache (`kv_cache.py`) for a batch: `prefill` runs the left-padded prompts through
the model once, then each `step` feeds one new token per row and returns the next logits `[B, Vl]`
of this rank's vocabulary slice. `generate` drives it: pick each row's next token (`sampling.py`), stop
a row at EOS or after `max_new_tokens`, and drop finished rows from the batch and the cache so that
the remaining rows do not pay for them. The output layer sees only the last position while the
decoder runs (a forward pre-hook, `output_rows`), so prefill computes one row of vocabulary
logits per prompt, not one per prompt token. Each row's draws come from uniforms seeded by
(seed, the row's key), indexed by the step, so a row generates the same tokens whatever batch it is
in, on a rerun and at every TP size.

An observer (`generate(..., on_logits=...)`, a `LogitsObserver`) sees the logits the decoder computes
anyway, so a caller that needs the model's distribution along the sequences (the teacher-sampled cache
job's targets) needs no second forward over them. With one, prefill computes the logits of every real
prompt position (the output layer sees only the real slots, `output_rows`, instead of the last
one); that costs one vocabulary row per prompt token, paid only by callers that asked. Without one,
nothing changes.

A ZeRO-3 student is passed as its DeepSpeed engine: its parameters are gathered once for the whole
call and ZeRO's per-module hooks are off meanwhile (`for_generation`), so a decoding step holds no
collective over the DP group and DP ranks may decode different numbers of steps; the cost is the
full model's parameters on each rank for the duration of the call.

Design choice: left padding, so every row's next token lands on the same cache slot and a step is one
forward over `[B, 1]`; the cost is that the prompts' padding slots take cache memory and prefill
compute (a batch of very unequal prompts wastes up to `B × (longest − shortest)` slots).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from pipeline.config import SamplingConfig
from pipeline.generate.kv_cache import KVCache
from pipeline.generate.sampling import next_tokens

PAD_ID = 0  # what padding slots hold; never attended, any valid id would do

LogitsObserver = Callable[[Tensor, Tensor, Tensor], None]
"""`on_logits(rows, positions, logits)`: the next-token logits of N (row, position) pairs.

`rows` [N] int64 (CPU): the rows' indices in the `prompts` passed to `generate` (finished rows are
dropped from the batch, the indices stay the original ones); `positions` [N] int64 (CPU): the absolute
position in its sequence (prompt then continuation, no padding) of the token each logits row follows;
`logits` [N, Vl] this rank's vocabulary slice, on the model's device, valid during the call only and not
to be modified. Called on every rank of the TP group in lockstep (the same rows and positions, so the
observer may run collectives over the group): once after prefill with every real prompt position of
every row (row-major: row 0's positions 0 … P_0 − 1, then row 1's, …), then once per decode step with
each active row's fed token, position P_b − 1 + s at step s ≥ 1 (the logits its next token is drawn
from). A row's last token (EOS, or the `max_new_tokens`-th) is never fed, so its logits never come.
"""


def draw_uniforms(seed: int, key: str, count: int) -> Tensor:
    """[count] float64 uniforms for the draws of the row `key`: the same on every rank and every rerun."""
    digest = hashlib.sha256(f"generate\0{seed}\0{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(count, generator=generator, dtype=torch.float64)


@contextlib.contextmanager
def for_generation(model):
    """The module to decode with, ready for the whole call.

    A DeepSpeed engine under ZeRO-3: DeepSpeed's own `unwrap_model_for_generation` gathers every
    parameter once and takes ZeRO's per-module hooks off for the block (with them on, every forward
    would gather and release each layer again), then puts the hooks back. Another DeepSpeed engine: its
    module. A bare module whose parameters ZeRO-3 partitioned: gathered once by `GatheredParameters` (its
    hooks, if an engine installed them, still gather per forward: pass the engine). Anything else: itself.
    """
    if hasattr(model, "zero_optimization_partition_weights"):  # a DeepSpeedEngine
        if model.zero_optimization_partition_weights():
            from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

            with unwrap_model_for_generation(model):
                yield model.module
            return
        yield model.module
        return
    params = list(model.parameters())
    if not any(hasattr(p, "ds_id") for p in params):
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield model


@contextlib.contextmanager
def output_rows(model, select):
    """Within the block, the model's output layer sees `select(hidden)` of its `[S, B, H]` input instead,
    so vocabulary rows are computed only for the positions a caller uses (`LAST`: each row's last slot,
    `[1, B, H]`; `real_slots(valid)`: every real slot as one `[1, N, H]` sequence, row-major). At a 32000
    vocabulary the output layer is most of a prefill's time; a decode step (S = 1) is unchanged by LAST.
    """
    def selected(module, args, kwargs):
        return (select(args[0]), *args[1:]), kwargs

    handle = model.output_layer.register_forward_pre_hook(selected, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def LAST(hidden: Tensor) -> Tensor:  # noqa: N802 - a selector constant for `output_rows`
    return hidden[-1:]


def real_slots(valid: Tensor):
    """The `output_rows` selector of the slots `valid` [B, S] marks."""
    return lambda hidden: hidden.transpose(0, 1)[valid].unsqueeze(0)


class Decoder:
    """Incremental forward passes of `model` over one batch; see the module docstring."""

    def __init__(self, model, prompts: Sequence[Tensor], max_new_tokens: int):
        if not prompts or any(p.ndim != 1 or p.numel() == 0 for p in prompts):
            raise ValueError("prompts: expected one or more non-empty 1-D token tensors")
        self.model = model
        self.device = model.embedding.word_embeddings.weight.device
        self.lengths = torch.tensor([p.numel() for p in prompts], device=self.device)
        self.width = int(self.lengths.max())
        self.cache = KVCache(model, len(prompts), self.width + max_new_tokens)
        self.prompts = prompts
        self.next_position = self.lengths.clone()

    def _forward(self, tokens: Tensor, positions: Tensor, valid: Tensor, every_real: bool = False) -> Tensor:
        """[B, Vl] logits of each row's last slot, or with `every_real` [N, Vl] of every valid slot."""
        self.cache.begin(valid)
        with self.cache.attached(), output_rows(self.model, real_slots(valid) if every_real else LAST):
            logits = self.model(tokens, positions=positions)
        self.cache.finish()
        return logits[:, -1]

    def prefill(self, on_logits: Optional[LogitsObserver] = None) -> Tensor:
        """[B, Vl] logits for each row's first new token, after its whole prompt; `on_logits` (if any)
        first sees every real prompt position's logits (see `LogitsObserver`)."""
        batch = len(self.prompts)
        tokens = torch.full((batch, self.width), PAD_ID, dtype=torch.int64, device=self.device)
        for row, prompt in enumerate(self.prompts):
            tokens[row, self.width - prompt.numel():] = prompt.to(self.device)
        pad = (self.width - self.lengths)[:, None]
        slots = torch.arange(self.width, device=self.device)[None, :]
        positions, valid = (slots - pad).clamp(min=0), slots >= pad
        if on_logits is None:
            return self._forward(tokens, positions, valid)
        real = self._forward(tokens, positions, valid, every_real=True)  # [Σ P_b, Vl], row-major
        lengths = self.lengths.cpu()
        on_logits(torch.arange(batch).repeat_interleave(lengths), positions[valid].cpu(), real)
        return real[(lengths.cumsum(0) - 1).to(self.device)]

    def step(self, tokens: Tensor) -> Tensor:
        """[B, Vl] logits after feeding one more token per row (`tokens` [B])."""
        positions = self.next_position[:, None]
        self.next_position = self.next_position + 1
        return self._forward(tokens.to(self.device)[:, None], positions,
                             torch.ones_like(positions, dtype=torch.bool))

    def keep(self, rows: Tensor) -> None:
        """Continue with `rows` (int64 indices into the current batch) only."""
        rows = rows.to(self.device)
        self.cache.keep(rows)
        self.next_position = self.next_position[rows]


@dataclass(frozen=True)
class Generation:
    """Each row's new tokens (ending with EOS where it stopped there) and whether it did."""

    tokens: list[Tensor]
    ended: list[bool]

    @property
    def new_tokens(self) -> int:
        return sum(t.numel() for t in self.tokens)


@torch.no_grad()
def generate(model, prompts: Sequence[Tensor], keys: Sequence[str], sampling: SamplingConfig, *, vocab_size: int,
             eos_id: Optional[int], seed: int = 0, group=None,
             on_step: Optional[Callable[[int], None]] = None,
             on_logits: Optional[LogitsObserver] = None, limits: Optional[Sequence[int]] = None) -> Generation:
    """Continuations of `prompts` (1-D int tensors) by `model` (this rank's TP slices, `group` its TP group;
    a DeepSpeed engine for a ZeRO-3 student, see `for_generation`).

    `keys` name the rows (a sample's key): they seed the draws. `on_step(n)` is called with the number
    of tokens each step added (for progress bars). `on_logits` sees the logits of every real position
    the decoder computes, prompt positions included (see `LogitsObserver`; None: prefill computes the
    last position's only). `limits` caps each row's new tokens below `sampling.max_new_tokens` (a row
    that reaches its cap leaves the batch, as one that meets EOS does). Every rank of `group` returns
    the same tokens.
    """
    if len(keys) != len(prompts):
        raise ValueError(f"keys: expected one per prompt ({len(prompts)}), got {len(keys)}")
    steps = sampling.max_new_tokens
    limits = torch.tensor([steps] * len(prompts) if limits is None else [min(int(n), steps) for n in limits])
    if limits.numel() != len(prompts) or bool((limits < 1).any()):
        raise ValueError(f"limits: expected one positive count per prompt ({len(prompts)}), got {limits.tolist()}")
    uniforms = torch.stack([draw_uniforms(seed, key, steps) for key in keys]) if keys else None
    with for_generation(model) as module:
        was_training = module.training
        module.eval()
        try:
            return _decode(module, prompts, uniforms, sampling, vocab_size, eos_id, group, on_step, on_logits,
                           limits)
        finally:
            module.train(was_training)


def _decode(model, prompts, uniforms, sampling, vocab_size, eos_id, group, on_step, on_logits,
            limits) -> Generation:
    steps = int(limits.max())
    decoder = Decoder(model, prompts, steps)
    out = [[] for _ in prompts]
    ended = [False] * len(prompts)
    active = torch.arange(len(prompts))
    lengths = torch.tensor([p.numel() for p in prompts])
    logits = decoder.prefill(on_logits)
    for step in range(steps):
        chosen = next_tokens(logits, uniforms[active, step], sampling, vocab_size=vocab_size, group=group).cpu()
        for row, token in zip(active.tolist(), chosen.tolist()):
            out[row].append(token)
        if on_step is not None:
            on_step(len(active))
        stop = chosen == eos_id if eos_id is not None else torch.zeros_like(chosen, dtype=torch.bool)
        for row in active[stop].tolist():
            ended[row] = True
        stop = stop | (limits[active] <= step + 1)
        if bool(stop.all()):
            break
        if bool(stop.any()):
            still = (~stop).nonzero().flatten()
            decoder.keep(still)
            active, chosen = active[still], chosen[still]
        logits = decoder.step(chosen)
        if on_logits is not None:  # the token fed at step + 1 sits at position P + step
            on_logits(active, lengths[active] + step, logits)
    return Generation([torch.tensor(t, dtype=torch.int64) for t in out], ended)

"""Prefix sources: a step's samples as they are, or continued by the online teacher or by the student.

f-DISTILL computes each divergence along prefixes from its own source: KL along the teacher's samples,
RKL along the student's, JS and TVD along both. `PrefixSampler.prepare` turns one optimizer step's
micro-batches into the ones the loss reads. Each micro-batch row gets a source by stratified assignment:
row j of a B-row micro-batch takes the source whose interval of [0, 1) (data, then teacher, then student,
with the configured fractions as widths) holds (j + ½)/B + φ mod 1, with φ a uniform drawn from (seed,
step, the micro-batch's first key). So every micro-batch holds each source's share up to one row (a
2-row micro-batch at ½–½ holds exactly one of each), the expected shares are exact even at B = 1, and the
assignment depends on the samples and the step only, not on which rank holds them.

A generated row keeps its sample's key; its prompt is the sample's first `prompt_len` tokens (all real
tokens of a shorter sample), its continuation is drawn by `pipeline.generate.generate` with the key
`KEY@STEP`, so draws are seeded by (seed, sample, optimizer step): a rerun, a resume from a checkpoint
(which holds the step) and every TP and DP size draw the same tokens, and no generator state needs
saving. The row is laid out as the teacher-sampled cache lays out its samples (`continued_sample`: prompt,
continuation, EOS padding, one document) with a loss mask on the generated positions (`loss_on`).

All rows one model continues in a step are decoded in one call: the student's parameters are gathered
once per optimizer step (ZeRO-3, `for_generation`), with the weights the step starts from, and every DP
rank takes part in that gather whenever the source's fraction is positive, with however many rows it has
(a non-integer share gives micro-batches one row more or less; none at all is a gather and no decode).
Generated tokens are data: the decoder runs under no_grad, so no gradient flows through sampling.

Design choice: generation happens inside the training step, synchronously. The cost is that the step
waits for decoding (perf/generate_s says how long); an asynchronous sampler would overlap it with the
student's update at the price of samples one step stale.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import PrefixSourcesConfig
from pipeline.generate.decode import generate
from pipeline.teacher.sampled_prefixes import continued_sample

SOURCES = ("data", "teacher", "student")


def phase_offset(seed: int, step: int, key: str) -> float:
    """φ in [0, 1): the stratified assignment's offset of one micro-batch (its first key) at `step`."""
    digest = hashlib.sha256(f"prefix-source\0{seed}\0{step}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def assign_sources(rows: int, fractions: dict[str, float], offset: float) -> list[str]:
    """The source of each of `rows` rows (see the module docstring)."""
    bounds, edge = [], 0.0
    for name in SOURCES:
        edge = round(edge + fractions.get(name, 0.0), 12)  # 0.1 + 0.2 is 0.3 here, as a config means it
        bounds.append(edge)
    out = []
    for j in range(rows):  # in units of rows, so a share of a whole number of rows gets exactly that many
        u = (j + 0.5 + offset * rows) % rows
        index = next((i for i, bound in enumerate(bounds) if u < bound * rows and fractions.get(SOURCES[i], 0) > 0),
                     max(i for i, name in enumerate(SOURCES) if fractions.get(name, 0) > 0))
        out.append(SOURCES[index])
    return out


@dataclass
class PrefixStats:
    """What the last `prepare` did: seconds decoding per model, and new tokens generated per source."""

    seconds: dict
    tokens: dict


class PrefixSampler:
    """Continues a step's rows with the online teacher or the student (`engine`)."""

    def __init__(self, *, teacher_model, vocab_size: int, eos_id: int, seq_len: int, seed: int, tp_group=None):
        self.teacher_model, self.vocab_size, self.eos_id = teacher_model, vocab_size, eos_id
        self.seq_len, self.seed, self.group = seq_len, seed, tp_group
        self.stats = PrefixStats({}, {})

    def prepare(self, micro_batches: list[dict], step: int, prefixes: PrefixSourcesConfig, student) -> list[dict]:
        """The micro-batches the loss reads at optimizer step `step` (0-based); `student` is the student's
        DeepSpeed engine (gathered once for the call under ZeRO-3)."""
        self.stats = PrefixStats({"teacher": 0.0, "student": 0.0}, {"teacher": 0, "student": 0})
        fractions = prefixes.fractions()
        plans = [assign_sources(len(b["keys"]), fractions, phase_offset(self.seed, step, b["keys"][0]))
                 for b in micro_batches]
        continued = {}
        for source, model in (("teacher", self.teacher_model), ("student", student)):
            if fractions[source] > 0:
                wanted = [(i, j) for i, plan in enumerate(plans) for j, s in enumerate(plan) if s == source]
                continued.update(self._continue(model, source, micro_batches, wanted, step, prefixes))
        return [self._rebuild(batch, i, plan, continued, prefixes) for i, (batch, plan) in
                enumerate(zip(micro_batches, plans))]

    def _prompt(self, batch: dict, row: int, prompt_len: int) -> np.ndarray:
        end = int(batch["segments"][row].max())
        return batch["tokens"][row, : min(prompt_len, end)].numpy().astype(np.int64)

    def _continue(self, model, source: str, batches: list[dict], wanted: list, step: int,
                  prefixes: PrefixSourcesConfig) -> dict:
        """{(micro-batch, row): (prompt, new tokens)} for the rows `model` continues; every DP rank calls it
        when the source's fraction is positive (a ZeRO-3 student's gather is collective)."""
        start = time.perf_counter()
        prompts = [self._prompt(batches[i], j, prefixes.prompt_len) for i, j in wanted]
        keys = [f"{batches[i]['keys'][j]}@{step}" for i, j in wanted]
        limits = [min(prefixes.sampling.max_new_tokens, self.seq_len + 1 - len(p)) for p in prompts]
        if prompts:
            out = generate(model, [torch.from_numpy(p) for p in prompts], keys, prefixes.sampling,
                           vocab_size=self.vocab_size, eos_id=self.eos_id, seed=self.seed, group=self.group,
                           limits=limits).tokens
        else:
            from pipeline.generate.decode import for_generation

            with for_generation(model):  # take part in the collective gather all the same
                out = []
        self.stats.seconds[source] += time.perf_counter() - start
        result = {}
        for (i, j), prompt, new, limit in zip(wanted, prompts, out, limits):
            new = new[:limit].numpy()
            self.stats.tokens[source] += len(new)
            result[(i, j)] = (prompt, new)
        return result

    def _rebuild(self, batch: dict, index: int, plan: list[str], continued: dict,
                 prefixes: PrefixSourcesConfig) -> dict:
        """`batch` with its generated rows replaced: tokens, segments, loss mask, and each row's source."""
        if all(s == "data" for s in plan):
            return dict(batch, sources=plan)
        tokens = batch["tokens"].clone()
        seq_len = tokens.shape[1] - 1
        mask = batch.get("loss_mask")
        mask = torch.ones(len(plan), seq_len, dtype=torch.bool) if mask is None else mask.clone()
        segments = [row[row >= 0].tolist() for row in batch["segments"]]
        for j, source in enumerate(plan):
            if source == "data":
                continue
            prompt, new = continued[(index, j)]
            row, seg, row_mask = continued_sample(prompt, new, seq_len=seq_len, eos_id=self.eos_id,
                                                  dtype=np.int64, loss_on=prefixes.loss_on)
            tokens[j] = torch.from_numpy(row)
            segments[j] = seg.tolist()
            mask[j] = torch.from_numpy(row_mask != 0)
        width = max(len(s) for s in segments)
        padded = torch.full((len(plan), width), -1, dtype=torch.int64)
        for j, seg in enumerate(segments):
            padded[j, : len(seg)] = torch.tensor(seg, dtype=torch.int64)
        out = {k: v for k, v in batch.items() if k != "sidecars"}
        out.update(tokens=tokens, segments=padded, loss_mask=mask, sources=plan)
        return out

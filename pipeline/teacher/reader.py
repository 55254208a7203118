"""The student side of the cache: a batch's joined cache members decoded into the loss's target types.

The data reader joins a cache folder to its token shards as a sidecar (`Source(tokens, sidecars=
{"teacher": cache})`), which checks tokenizer, source sha256 and keys; each sample of a batch then
carries the cache member under `teacher.topk.bin` or `teacher.sampled.bin`. `CacheTargets` decodes a
batch of them into `SparseTargets` ([B, S, K] ids and log-probs, [B, S] log rest) or `SampledTargets`
([B, S, W] distinct ids and counts, W the batch's widest position, −1/0 padded), at the temperature the
cache was written at. A record holds only the positions whose label is a real token (format.py); the
batch's `segments` say how many, and the positions after them are returned empty (ids −1, log-probs
and log rest 0, counts 0): the loss must mask them (`pipeline.data.dataset.loss_positions`, which also
applies a sample's loss mask; the cache still holds targets at every real position, masked or not), and
refuses empty sampled or renorm targets at a position that counts.

`sparse_mode` is the caller's choice of how top-K targets are compared; the trainer's eval always
asks for "tail" (pipeline/train/evaluate.py), whatever the training run's `loss.target_mode`.

Design choice: decoding happens where the batch is consumed (the training process), on the CPU with
vectorised numpy; the cost is CPU time per step, measured by benchmarks/cache.py in positions per
second, against keeping decoded targets (10-20× larger) in the data pipeline.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.sources import ShardSet
from pipeline.losses.targets import SampledTargets, SparseTargets
from pipeline.teacher.codec import SampledCodec, pad_width
from pipeline.teacher.errors import CacheError
from pipeline.teacher.format import codec_of, decode_record, target_positions


class CacheTargets:
    """Decodes the cache members of a batch from the sidecar folder `location` joined under `prefix`."""

    def __init__(self, location: str, *, prefix: str = "teacher", sparse_mode: str = "tail"):
        self.location, self.prefix, self.sparse_mode = location, prefix, sparse_mode
        shards = ShardSet(location, role=f"sidecar {prefix!r}")
        self.record = shards.manifest.extra.get("targets")
        if not isinstance(self.record, dict):
            raise CacheError(f"{location}: the manifest has no targets record; this is not a teacher cache")
        self.codec = codec_of(self.record, where=f"{location}/manifest.json")
        self.member = f"{prefix}.{self.record['member']}"

    @property
    def temperature(self) -> float:
        return float(self.record["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.record["vocab_size"])

    def payloads(self, batch: dict) -> list[tuple[str, bytes]]:
        joined = batch.get("sidecars")
        if joined is None:
            raise CacheError(f"batch has no sidecars; join the cache {self.location} to the token source as "
                             f"sidecar {self.prefix!r}")
        out = []
        for key, members in zip(batch["keys"], joined):
            if self.member not in members:
                raise CacheError(f"sample {key!r}: no member {self.member!r}; is {self.location} joined as "
                                 f"sidecar {self.prefix!r}?")
            out.append((key, members[self.member]))
        return out

    def targets(self, batch: dict, device: torch.device | str = "cpu") -> SparseTargets | SampledTargets:
        """The batch's targets on `device`, shapes [B, S, ...] aligned with the student's logits."""
        counts = target_positions(batch["segments"]).tolist()
        decoded = [decode_record(self.codec, payload, count, where=f"{self.location} sample {key!r}")
                   for (key, payload), count in zip(self.payloads(batch), counts, strict=True)]
        if isinstance(self.codec, SampledCodec):
            return self._sampled(decoded, device)
        decoded = [_pad_positions(parts, self.codec.positions, (-1, 0.0, 0.0)) for parts in decoded]
        ids, logprobs, log_rest = (torch.from_numpy(np.stack(parts)).to(device) for parts in zip(*decoded))
        return SparseTargets(ids, logprobs, log_rest, mode=self.sparse_mode, temperature=self.temperature)

    def _sampled(self, decoded: list, device) -> SampledTargets:
        width = max(1, max(ids.shape[1] for ids, _ in decoded))
        decoded = [_pad_positions(pad_width(i, c, width), self.codec.positions, (-1, 0)) for i, c in decoded]
        ids, counts = (np.stack(parts) for parts in zip(*decoded))
        return SampledTargets(torch.from_numpy(ids).to(device), torch.from_numpy(counts).to(device),
                              temperature=self.temperature)


def _pad_positions(parts: tuple, positions: int, fills: tuple) -> tuple:
    """Each array of a decoded record extended along its first axis to `positions` rows of `fill`."""
    return tuple(np.concatenate([a, np.full((positions - a.shape[0],) + a.shape[1:], fill, a.dtype)])
                 if a.shape[0] < positions else a for a, fill in zip(parts, fills))

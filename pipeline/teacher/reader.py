"""The student side of the cache: a batch's joined cache members decoded into the loss's target types.

The data reader joins a cache folder to its token shards as a sidecar (`Source(tokens, sidecars=
{"teacher": cache})`), which checks tokenizer, source sha256 and keys; each sample of a batch then
carries the cache member under `teacher.topk.bin` or `teacher.sampled.bin`. `CacheTargets` decodes a
batch of them into `SparseTargets` ([B, S, K] ids and log-probs, [B, S] log rest) or `SampledTargets`
([B, S, W] distinct ids and counts, W the batch's widest position, −1/0 padded), at the temperature the
cache was written at.

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
from pipeline.teacher.format import codec_of


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
        decoded = [self.codec.decode(payload, where=f"{self.location} sample {key!r}")
                   for key, payload in self.payloads(batch)]
        if isinstance(self.codec, SampledCodec):
            return self._sampled(decoded, device)
        ids, logprobs, log_rest = (torch.from_numpy(np.stack(parts)).to(device) for parts in zip(*decoded))
        return SparseTargets(ids, logprobs, log_rest, mode=self.sparse_mode, temperature=self.temperature)

    def _sampled(self, decoded: list, device) -> SampledTargets:
        width = max(ids.shape[1] for ids, _ in decoded)
        ids, counts = (np.stack(parts) for parts in zip(*(pad_width(i, c, width) for i, c in decoded)))
        return SampledTargets(torch.from_numpy(ids).to(device), torch.from_numpy(counts).to(device),
                              temperature=self.temperature)

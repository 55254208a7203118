"""The resumable, deterministic stream of micro-batches that one data-parallel rank trains on.

`TokenShardDataset` is an `IterableDataset` over one or more token-shard sets (blended by weight),
each optionally joined with sidecar shard sets. It yields whole micro-batches keyed by a global step
number; which samples step g holds is a pure function of (seed, g, dp_rank, dp_size, micro_batch,
shuffle settings, the manifests) — see `order.py`. TP ranks of one DP group pass the same dp_rank and
get identical batches; the dataset never reads a process group.

DataLoader workers: worker w of n yields steps start+w, start+w+n, ..., and the loader's in-order
round-robin restores start, start+1, ... exactly, whatever n. The cost: every worker reads (not
decodes) the whole of each window its steps touch, i.e. n× the I/O of one reader.

Resumption: the state is the next step number plus what decides the order; a restored dataset
computes that step's window, opens the shard there (a header seek in a plain tar; a compressed token
shard is decompressed up to there, at most one shard) and reads at most one window of raw
samples it does not decode, whatever the position. Memory: one window of raw samples (plus sidecar
members) per source and worker.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data.order import BlendTable, SourceOrder, StepLayout
from pipeline.data.shards import ShardReader, verify_shard
from pipeline.data.sources import ShardSet, join_sample, sidecar_shards
from tokenization.format import ShardFormatError, decode_mask, decode_sample

STATE_VERSION = 1
_ORDER_FIELDS = ("dp_size", "seed", "fingerprint", "micro_batch", "shuffle", "shuffle_window", "blend_period")


@dataclass(frozen=True)
class Source:
    """One token-shard folder (or URL prefix), its blend weight, and its sidecars {prefix: folder}."""

    path: str
    weight: float = 1.0
    sidecars: dict = field(default_factory=dict)


def _as_source(spec) -> Source:
    return spec if isinstance(spec, Source) else Source(os.fspath(spec))


def _open_sidecars(tokens: ShardSet, sidecars: dict) -> list:
    """[(prefix, sidecar set, token shard index → sidecar shard index)], checked against the manifests."""
    joins = []
    for prefix, path in sidecars.items():
        side = ShardSet(os.fspath(path), f"sidecar {prefix!r}")
        joins.append((prefix, side, sidecar_shards(tokens, side)))
    return joins


class _SourceStream:
    """Raw samples of one source by index in its endless stream; loads one window at a time."""

    def __init__(self, tokens: ShardSet, sidecars: list, order: SourceOrder, verify: bool):
        self.tokens, self.sidecars, self.order, self.verify = tokens, sidecars, order, verify
        self.readers: dict[str | None, ShardReader] = {}
        self.loaded, self.window = None, []

    def sample(self, index: int) -> dict:
        epoch, position = divmod(index, self.order.total)
        block = self.order.block_of(position)
        if self.loaded != (epoch, block):
            self.window, self.loaded = self._load(epoch, block), (epoch, block)
        return self.window[self.order.index_in_block(epoch, position)]

    def _load(self, epoch: int, block: int) -> list[dict]:
        samples = []
        for shard, offset, count in self.order.block_ranges(epoch, block):
            raws = self._reader(None, self.tokens, shard, offset).take(count)
            where = self.tokens.where(shard)
            for raw in raws:
                raw["__where__"] = where
            for prefix, side, index in self.sidecars:
                side_shard = index[shard]
                for raw, extra in zip(raws, self._reader(prefix, side, side_shard, offset).take(count), strict=True):
                    join_sample(raw, extra, prefix=prefix, where=side.where(side_shard))
            samples.extend(raws)
        return samples

    def _reader(self, name, shards: ShardSet, shard: int, offset: int) -> ShardReader:
        url, reader = shards.url(shard), self.readers.get(name)
        if reader is not None and reader.url == url and reader.next_index <= offset:
            reader.skip_to(offset)  # sequential continuation: no reopen
            return reader
        if reader is not None:
            reader.close()
        entry = shards.manifest.shards[shard]
        if self.verify:
            verify_shard(url, entry.sha256, where=shards.where(shard))
        self.readers[name] = ShardReader(url, expected=entry.samples, start=offset, where=shards.where(shard))
        return self.readers[name]

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


class TokenShardDataset(IterableDataset):
    """Micro-batches for one DP rank: dict(tokens [B, seq_len+1] int64, segments [B, S] int64 padded
    with -1, keys, step, epoch, `sidecars`: per sample {prefix.member: bytes} when joined, and
    `loss_mask` [B, seq_len] bool when any sample of the batch has a `mask.npy` member (generated
    sequences; a row without one is all True)). A consumer takes the positions that count in the loss,
    eval and token counts from `loss_positions(batch, seq_len)`: a real label (`label_mask`) and, where
    the batch has one, its loss mask."""

    def __init__(self, sources, *, micro_batch: int, dp_rank: int, dp_size: int, seed: int,
                 shuffle: bool = True, shuffle_window: int = 256, verify: bool = False,
                 blend_period: int = 1000, max_epochs: int | None = None):
        specs = [_as_source(s) for s in (sources if isinstance(sources, (list, tuple)) else [sources])]
        self.sets = [ShardSet(s.path) for s in specs]
        self._check_compatible()
        self.sidecars = [_open_sidecars(tokens, s.sidecars) for tokens, s in zip(self.sets, specs)]
        self.weights = [float(s.weight) for s in specs]
        self.micro_batch, self.dp_rank, self.dp_size, self.seed = micro_batch, dp_rank, dp_size, seed
        self.shuffle, self.shuffle_window, self.verify = shuffle, shuffle_window, verify
        self.blend_period, self.max_epochs = blend_period, max_epochs
        self.orders = [SourceOrder([e.samples for e in s.manifest.shards], seed=seed, source_id=i,
                                   window=shuffle_window, shuffle=shuffle) for i, s in enumerate(self.sets)]
        self.blend = BlendTable(self.weights, blend_period)
        epoch_samples = sum(order.total for order in self.orders)
        self.layout = StepLayout(epoch_samples, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size)
        self.fingerprint = self._fingerprint()
        self.seq_len, self.dtype = self.sets[0].manifest.seq_len, self.sets[0].manifest.dtype
        self._next_step = 0

    def _check_compatible(self) -> None:
        first = self.sets[0].manifest
        for other in self.sets[1:]:
            m = other.manifest
            if (m.tokenizer_fingerprint, m.seq_len) != (first.tokenizer_fingerprint, first.seq_len):
                raise ShardFormatError(f"{other.location}: tokenizer {m.tokenizer_fingerprint} / seq_len {m.seq_len} "
                                       f"differ from {self.sets[0].location}'s {first.tokenizer_fingerprint} / "
                                       f"{first.seq_len}; blended sources must share both")

    def _fingerprint(self) -> str:
        parts = [f"{s.fingerprint()}*{w!r}" for s, w in zip(self.sets, self.weights)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    @property
    def steps_per_epoch(self) -> int:
        return self.layout.steps_per_epoch

    def state_dict(self, next_step: int | None = None) -> dict:
        """The cursor (the next step to yield) and everything that decides the order."""
        state = {"version": STATE_VERSION, "next_step": self._next_step if next_step is None else next_step,
                 "dp_rank": self.dp_rank}
        state.update({name: getattr(self, name) for name in _ORDER_FIELDS})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved step; a state of another order (DP size, seed, data, ...) is refused."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r}; this reader reads {STATE_VERSION}")
        differ = [f"{name}: saved {state.get(name)!r}, now {getattr(self, name)!r}"
                  for name in _ORDER_FIELDS if state.get(name) != getattr(self, name)]
        if differ:
            raise ValueError("data state was saved for a different stream; refusing to resume: " + "; ".join(differ))
        self._next_step = int(state["next_step"])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        streams = self._streams()
        last = None if self.max_epochs is None else self.max_epochs * self.steps_per_epoch
        try:
            for step in itertools.count(self._next_step + worker, workers):
                if last is not None and step >= last:
                    return
                batch = self._batch(streams, step)
                if info is None:
                    self._next_step = step + 1
                yield batch
        finally:
            for stream in streams:
                stream.close()

    def batch(self, step: int) -> dict:
        """Step `step`'s micro-batch, read on its own (tests and tools; the stream is faster)."""
        streams = self._streams()
        try:
            return self._batch(streams, step)
        finally:
            for stream in streams:
                stream.close()

    def _streams(self) -> list[_SourceStream]:
        return [_SourceStream(s, joins, order, self.verify)
                for s, joins, order in zip(self.sets, self.sidecars, self.orders)]

    def _batch(self, streams, step: int) -> dict:
        raws = [streams[src].sample(index) for src, index in map(self.blend.locate, self.layout.positions(step))]
        decoded = [decode_sample(raw, seq_len=self.seq_len, dtype=self.dtype, where=raw["__where__"]) for raw in raws]
        tokens, segments = collate(decoded)
        batch = {"tokens": tokens, "segments": segments, "keys": [raw["__key__"] for raw in raws],
                 "step": step, "epoch": step // self.steps_per_epoch}
        masks = [decode_mask(raw, seq_len=self.seq_len, where=raw["__where__"]) for raw in raws]
        if any(mask is not None for mask in masks):
            batch["loss_mask"] = collate_masks(masks, self.seq_len)
        if any(self.sidecars):
            batch["sidecars"] = [raw.get("sidecars", {}) for raw in raws]
        return batch


def collate(decoded: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded (tokens, segments) samples as tensors: tokens [B, seq_len+1] int64, segments [B, S] int64
    padded with −1 to the batch's most segments."""
    width = max(len(seg) for _, seg in decoded)
    segments = np.full((len(decoded), width), -1, dtype=np.int64)
    for row, (_, seg) in enumerate(decoded):
        segments[row, : len(seg)] = seg
    return torch.from_numpy(np.stack([tok for tok, _ in decoded]).astype(np.int64)), torch.from_numpy(segments)


def collate_masks(masks: list, seq_len: int) -> torch.Tensor:
    """Bool [B, seq_len] of the samples' loss masks (uint8 [seq_len] or None: every position counts)."""
    out = np.ones((len(masks), seq_len), dtype=np.bool_)
    for row, mask in enumerate(masks):
        if mask is not None:
            out[row] = mask != 0
    return torch.from_numpy(out)


def label_mask(segments: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Bool [B, seq_len]: position t counts iff its label, token t + 1, is real (t + 1 < end, end = the
    row's largest `segments` entry, so collate's −1 padding is ignored). Every position of a concat
    sample counts; a bestfit sample's padding counts nowhere (loss, eval, token counts)."""
    ends = segments.max(dim=-1, keepdim=True).values
    return torch.arange(1, seq_len + 1, device=segments.device) < ends


def loss_positions(batch: dict, seq_len: int) -> torch.Tensor:
    """Bool [B, seq_len]: position t counts in the loss, eval metrics and token counts iff its label is a real
    token (`label_mask`) and, when the batch carries a `loss_mask` (generated sequences), the mask says so."""
    real = label_mask(batch["segments"], seq_len)
    mask = batch.get("loss_mask")
    return real if mask is None else real & mask.to(real.device, torch.bool)

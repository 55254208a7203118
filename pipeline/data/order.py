"""Where every sample of the stream comes from: pure functions of (seed, epoch, global index).

Three layers, each a pure function with O(1)-ish cost per lookup, so a reader can jump to any step:

- `SourceOrder`: the epoch order of one token-shard set. A seeded permutation of the shards, then a
  seeded permutation inside each window of `window` consecutive samples of that shard order.
  Design choice: a window ("block") shuffle rather than a full permutation of the epoch, so reads stay
  sequential inside tars (a block is one contiguous run of samples, read front to back). The cost is
  weaker mixing: two samples more than a window apart in the shard order never swap, and a reader
  holds one window of raw samples in memory.
- `BlendTable`: a deterministic interleave of several sources by weight. A period of `period` slots
  holds each source's count (largest remainder of weight × period), spread by smooth weighted
  round-robin; proportions are exact per period, within 1/period per source. Each source is an
  endless stream of its own epochs, so a heavily weighted small source repeats (its epoch e+1 is a
  new order) while a light one is part-read; a blend "epoch" is defined as Σ source sizes samples.
- `StepLayout`: samples (not shards) per data-parallel rank. Each blend epoch of `L` samples is cut
  into `dp_size` contiguous spans of `S·B` samples (`S = L // (dp_size·B)` steps); rank r reads its own
  span front to back. The last `L − dp_size·S·B` positions of every epoch are dropped, so every rank
  has exactly `S` steps per epoch (with shuffling, the dropped samples change from epoch to epoch).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def seeded_rng(*words: int) -> np.random.Generator:
    """A numpy generator that depends only on `words` (never on the environment or the clock)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


class SourceOrder:
    """Epoch order of one source: shard permutation, then a permutation inside each window."""

    def __init__(self, shard_samples, *, seed: int, source_id: int, window: int, shuffle: bool):
        if window < 1:
            raise ValueError(f"shuffle_window must be ≥ 1, got {window}")
        self.counts = np.asarray(shard_samples, dtype=np.int64)
        self.total = int(self.counts.sum())
        if self.total == 0:
            raise ValueError("a source has no samples")
        self.seed, self.source_id, self.window, self.shuffle = seed, source_id, window, shuffle
        self._shard_order = lru_cache(maxsize=4)(self._compute_shard_order)
        self._block_perm = lru_cache(maxsize=8)(self._compute_block_perm)

    def _compute_shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard indices in reading order, start of each in the epoch's concatenated order)."""
        order = np.arange(len(self.counts))
        if self.shuffle:
            order = seeded_rng(self.seed, self.source_id, epoch, 0).permutation(len(self.counts))
        starts = np.concatenate([[0], np.cumsum(self.counts[order])[:-1]])
        return order, starts

    def _compute_block_perm(self, epoch: int, block: int) -> np.ndarray:
        size = min(self.window, self.total - block * self.window)
        if not self.shuffle:
            return np.arange(size)
        return seeded_rng(self.seed, self.source_id, epoch, 1, block).permutation(size)

    def block_of(self, position: int) -> int:
        return position // self.window

    def index_in_block(self, epoch: int, position: int) -> int:
        """Index, within its block read in shard order, of the sample at `position` of the epoch."""
        block = position // self.window
        return int(self._block_perm(epoch, block)[position - block * self.window])

    def block_ranges(self, epoch: int, block: int) -> list[tuple[int, int, int]]:
        """The block's samples in reading order as (shard index, first offset, count) runs."""
        order, starts = self._shard_order(epoch)
        first = block * self.window
        last = min(first + self.window, self.total)
        runs = []
        pos = int(np.searchsorted(starts, first, side="right")) - 1
        while first < last:
            shard = int(order[pos])
            offset = first - int(starts[pos])
            count = min(int(self.counts[shard]) - offset, last - first)
            if count > 0:
                runs.append((shard, offset, count))
            first += max(count, 0)
            pos += 1
        return runs


class BlendTable:
    """Blended position p ↦ (source, index in that source's own endless stream)."""

    def __init__(self, weights, period: int = 1000):
        weights = np.asarray(weights, dtype=np.float64)
        if len(weights) == 0 or np.any(weights <= 0) or not np.all(np.isfinite(weights)):
            raise ValueError(f"blend weights must be positive and finite, got {weights.tolist()}")
        period = 1 if len(weights) == 1 else period
        share = weights / weights.sum() * period
        counts = np.floor(share).astype(np.int64)
        for i in np.argsort(-(share - counts), kind="stable")[: period - int(counts.sum())]:
            counts[i] += 1
        if np.any(counts == 0):
            raise ValueError(f"blend weights {weights.tolist()}: a source would get no slot in a period of "
                             f"{period}; raise blend_period")
        self.period, self.counts = period, counts
        self.source = np.empty(period, dtype=np.int64)
        self.rank = np.empty(period, dtype=np.int64)
        current, seen = np.zeros(len(counts), dtype=np.int64), np.zeros(len(counts), dtype=np.int64)
        for slot in range(period):  # smooth weighted round-robin: spreads each source evenly
            current += counts
            i = int(np.argmax(current))
            current[i] -= period
            self.source[slot], self.rank[slot] = i, seen[i]
            seen[i] += 1

    def locate(self, position: int) -> tuple[int, int]:
        cycle, slot = divmod(position, self.period)
        source = int(self.source[slot])
        return source, cycle * int(self.counts[source]) + int(self.rank[slot])


class StepLayout:
    """Global step g of one DP rank ↦ the blended positions of its micro-batch."""

    def __init__(self, epoch_samples: int, *, micro_batch: int, dp_rank: int, dp_size: int):
        if micro_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need micro_batch ≥ 1 and 0 ≤ dp_rank < dp_size, got micro_batch={micro_batch}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        self.epoch_samples, self.micro_batch, self.dp_rank, self.dp_size = epoch_samples, micro_batch, dp_rank, dp_size
        self.steps_per_epoch = epoch_samples // (dp_size * micro_batch)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{epoch_samples} samples per epoch cannot fill one step of dp_size={dp_size} × "
                             f"micro_batch={micro_batch}")

    def positions(self, step: int) -> range:
        epoch, t = divmod(step, self.steps_per_epoch)
        start = epoch * self.epoch_samples + (self.dp_rank * self.steps_per_epoch + t) * self.micro_batch
        return range(start, start + self.micro_batch)

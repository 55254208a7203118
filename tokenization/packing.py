"""Pack tokenized documents into fixed windows of `seq_len + 1` tokens with document boundaries.

Two modes, both deterministic functions of the documents in order:
- `concat`: documents (each followed by EOS) are joined into one stream and cut into windows. No
  padding, so every stored token is real; the cost is that documents are cut at window edges and the
  tail that does not fill a last window is dropped (`ConcatPacker.pending` says how many tokens).
- `bestfit`: best-fit decreasing over whole documents: a document is split only when it is longer than
  a window (into full windows plus a remainder); pieces go into the fullest window they fit, the rest of
  a window is padded with EOS. Fewer cut documents; the cost is padding and holding one input file's
  documents in memory to sort them.

Each window comes with `segments` (format.py): the start of each document piece, then the end of real tokens.
"""
from __future__ import annotations

import bisect
from typing import Iterable, Iterator

import numpy as np

Window = tuple[np.ndarray, np.ndarray]


def with_eos(ids, eos_id: int, dtype: np.dtype) -> np.ndarray:
    """A document's ids followed by EOS, as one array of the shard's dtype."""
    doc = np.empty(len(ids) + 1, dtype=dtype)
    doc[:-1] = ids
    doc[-1] = eos_id
    return doc


class ConcatPacker:
    """Joins documents (already ending with EOS) and cuts full windows as soon as they are complete."""

    def __init__(self, seq_len: int, dtype: np.dtype):
        self.window = seq_len + 1
        self.dtype = np.dtype(dtype)
        self._chunks: list[np.ndarray] = []
        self._starts: list[int] = []  # document starts, offsets into the pending stream
        self.pending = 0  # tokens waiting for a window

    def add(self, doc: np.ndarray) -> Iterator[Window]:
        """Append one document; yield every window it completes."""
        self._starts.append(self.pending)
        self._chunks.append(doc)
        self.pending += len(doc)
        if self.pending < self.window:
            return
        stream = np.concatenate(self._chunks)
        full = self.pending // self.window
        starts = np.asarray(self._starts, dtype=np.int64)
        for k in range(full):
            lo = k * self.window
            inside = starts[(starts > lo) & (starts < lo + self.window)] - lo
            segments = np.concatenate([[0], inside, [self.window]]).astype(np.int32)
            yield stream[lo:lo + self.window].copy(), segments
        cut = full * self.window
        rest = stream[cut:]
        self._chunks = [rest] if len(rest) else []
        self._starts = [int(s) - cut for s in starts if s >= cut]
        self.pending = len(rest)


def bestfit(docs: Iterable[np.ndarray], seq_len: int, eos_id: int, dtype: np.dtype) -> Iterator[Window]:
    """Windows of best-fit decreasing packing over documents that already end with EOS; padded with EOS.

    Windows come out ordered by their first piece (document index, piece index), so a split document's
    full windows are consecutive.
    """
    window = seq_len + 1
    bins: list[list[tuple[int, int, np.ndarray]]] = []
    pieces: list[tuple[int, int, np.ndarray]] = []
    for d, doc in enumerate(docs):
        full = len(doc) // window
        for p in range(full):
            bins.append([(d, p, doc[p * window:(p + 1) * window])])
        if len(doc) % window:
            pieces.append((d, full, doc[full * window:]))
    pieces.sort(key=lambda piece: (-len(piece[2]), piece[0], piece[1]))
    open_bins: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for piece in pieces:
        size = len(piece[2])
        at = bisect.bisect_left(open_bins, (size, -1))
        if at < len(open_bins):
            room, index = open_bins.pop(at)
            bins[index].append(piece)
        else:
            room, index = window, len(bins)
            bins.append([piece])
        if room - size > 0:
            bisect.insort(open_bins, (room - size, index))
    for content in sorted((sorted(b, key=lambda piece: piece[:2]) for b in bins), key=lambda b: b[0][:2]):
        yield _padded(content, window, eos_id, dtype)


def _padded(content: list[tuple[int, int, np.ndarray]], window: int, eos_id: int, dtype: np.dtype) -> Window:
    tokens = np.full(window, eos_id, dtype=dtype)
    starts, at = [], 0
    for _, _, piece in content:
        starts.append(at)
        tokens[at:at + len(piece)] = piece
        at += len(piece)
    return tokens, np.asarray(starts + [at], dtype=np.int32)

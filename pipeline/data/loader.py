"""A DataLoader over `TokenShardDataset` that knows where it is, for checkpoints.

With worker processes the dataset object in the trainer's process never sees the stream advance, so
this wrapper records the step of each batch it hands out and saves `next_step = last + 1`. Design
choice: the position is taken from the batches themselves rather than from counting, so prefetched
but unconsumed batches are never counted as consumed; the cost is that a restore re-creates the
workers (and re-reads at most one window per source and worker).

A worker that meets bad data (a corrupt or truncated shard, a missing file) hands the error object itself
to the trainer's process as its next item, which raises it there unchanged: the user sees the reader's one
message naming the file, not torch's re-raised copy with the worker's traceback folded into the message.
Other exceptions (bugs) keep torch's behaviour, worker traceback included.
"""
from __future__ import annotations

from torch.utils.data import DataLoader, IterableDataset

from pipeline.data.dataset import TokenShardDataset
from pipeline.teacher.errors import CacheError
from pipeline.train.errors import TrainError
from tokenization.errors import TokenizationError
from tokenization.format import ShardFormatError

# errors that describe the input, each with a message naming the file; `distill` prints them as one line
INPUT_ERRORS = (ShardFormatError, CacheError, TrainError, TokenizationError, OSError)


class _WorkerError:
    """An input error met in a worker, carried to the trainer's process in place of a batch."""

    def __init__(self, error: BaseException):
        self.error = error


class _Reporting(IterableDataset):
    """The dataset as a worker iterates it, with input errors turned into a `_WorkerError` item."""

    def __init__(self, dataset: TokenShardDataset):
        self.dataset = dataset

    def __iter__(self):
        try:
            yield from self.dataset
        except INPUT_ERRORS as err:
            yield _WorkerError(err)


class ResumableLoader:
    """Iterate batches in step order with `num_workers` processes; `state_dict()` after any batch."""

    def __init__(self, dataset: TokenShardDataset, *, num_workers: int = 0, prefetch_factor: int | None = None,
                 multiprocessing_context: str | None = None):
        self.dataset, self.num_workers = dataset, num_workers
        self.prefetch_factor, self.multiprocessing_context = prefetch_factor, multiprocessing_context
        self._next_step = dataset.state_dict()["next_step"]

    def __iter__(self):
        self.dataset.load_state_dict(self.dataset.state_dict(self._next_step))
        extra = {} if self.num_workers == 0 else {"prefetch_factor": self.prefetch_factor,
                                                   "multiprocessing_context": self.multiprocessing_context}
        dataset = self.dataset if self.num_workers == 0 else _Reporting(self.dataset)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, **extra)
        for batch in loader:
            if isinstance(batch, _WorkerError):
                raise batch.error
            if batch["step"] != self._next_step:
                raise RuntimeError(f"data loader yielded step {batch['step']}, expected {self._next_step}")
            self._next_step = batch["step"] + 1
            yield batch

    def state_dict(self) -> dict:
        return self.dataset.state_dict(self._next_step)

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self._next_step = int(state["next_step"])

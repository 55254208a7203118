"""The batches one rank trains on: `grad_accumulation` micro-batches per optimizer step, with teacher targets.

Invariance across data-parallel sizes. Each rank reads `grad_accumulation` streams ("slots") of the
data reader, slot i of DP rank r being reader rank r·G + i of dp·G. Optimizer step t takes step t of
every slot, so the samples of one optimizer step are the same set whatever dp and G are, as long as
dp × G and the micro-batch are: 1 rank with G = 8 trains on exactly what 8 ranks with G = 1 do, and
since gradients are averaged over slots either way, the run is the same up to summation order.

Design choice: one `ResumableLoader` per slot, so each keeps its own exact cursor and the checkpoint
holds G small states; the cost is G × num_workers reader processes per rank (G is usually small when
dp is large, and 1 with num_workers = 0 reads in the trainer's own process).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.config import TrainConfig
from pipeline.data.dataset import Source, TokenShardDataset
from pipeline.data.loader import ResumableLoader
from pipeline.train.errors import TrainError
from tokenization.format import ShardFormatError

TEACHER = "teacher"


def make_dataset(tokens: str, cache: str, cfg: TrainConfig, *, rank: int, size: int, shuffle: bool,
                 max_epochs: int | None = None) -> TokenShardDataset:
    """The data reader of reader rank `rank` of `size`, the teacher cache (if any) joined as sidecar 'teacher'."""
    source = Source(tokens, sidecars={TEACHER: cache} if cache else {})
    try:
        return TokenShardDataset(source, micro_batch=cfg.schedule.micro_batch, dp_rank=rank, dp_size=size,
                                 seed=cfg.seed, shuffle=shuffle, shuffle_window=cfg.data.shuffle_window,
                                 verify=cfg.data.verify, max_epochs=max_epochs)
    except ValueError as err:
        if isinstance(err, ShardFormatError):
            raise
        raise TrainError(f"{tokens}: {err} (schedule.micro_batch={cfg.schedule.micro_batch} × {size} data-parallel "
                         "slots); use more data, or a smaller micro_batch, grad_accumulation or dp") from None


@dataclass
class StepBatches:
    """The micro-batches of one optimizer step and the seconds spent waiting for them."""

    micro_batches: list
    wait_s: float


class TrainStream:
    """Micro-batches for optimizer steps, resumable: `state_dict()` after any step."""

    def __init__(self, cfg: TrainConfig, *, dp_rank: int, dp_size: int):
        slots = cfg.schedule.grad_accumulation
        self.datasets = [make_dataset(cfg.data.tokens, cfg.data.teacher_cache, cfg, rank=dp_rank * slots + i,
                                      size=dp_size * slots, shuffle=cfg.data.shuffle) for i in range(slots)]
        workers = cfg.data.num_workers
        extra = {"prefetch_factor": 4, "multiprocessing_context": "fork"} if workers else {}
        self.loaders = [ResumableLoader(ds, num_workers=workers, **extra) for ds in self.datasets]
        self._iterators = None

    @property
    def steps_per_epoch(self) -> int:
        return self.datasets[0].steps_per_epoch

    @property
    def seq_len(self) -> int:
        return self.datasets[0].seq_len

    def next_step(self) -> StepBatches:
        start = time.perf_counter()
        if self._iterators is None:
            self._iterators = [iter(loader) for loader in self.loaders]
        batches = [next(it) for it in self._iterators]
        return StepBatches(batches, time.perf_counter() - start)

    def state_dict(self) -> dict:
        return {"slots": [loader.state_dict() for loader in self.loaders]}

    def load_state_dict(self, state: dict) -> None:
        slots = state.get("slots", [])
        if len(slots) != len(self.loaders):
            raise ValueError(f"data state has {len(slots)} slots (grad_accumulation), this run has "
                             f"{len(self.loaders)}; refusing to resume")
        self.close()
        for loader, slot in zip(self.loaders, slots):
            loader.load_state_dict(slot)

    def close(self) -> None:
        """Stop the reader processes (a later `next_step` starts them again at the saved cursor)."""
        for it in self._iterators or []:
            it.close()
        self._iterators = None

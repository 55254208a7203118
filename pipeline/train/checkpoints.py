"""Checkpoints of a training run: DeepSpeed's own files plus what it does not hold, and `latest`.

Layout under run_dir/checkpoints:
    latest                      the tag of the newest complete checkpoint (replaced atomically)
    step_00000500/              one folder per checkpoint (a DeepSpeed tag folder)
        zero_pp_rank_D_mp_rank_TT_{model,optim}_states.pt   DeepSpeed ZeRO-3, one pair per rank
        trainer/rank_RRRRR.pt   per rank: data cursors, RNG states, counters
        run.json                the resolved config, the run's identity, the layout, the step

Order of a save: every rank writes and fsyncs its own files, a barrier, then rank 0 writes run.json,
points `latest` at the folder and deletes all but the newest `keep`. A crash at any moment leaves
`latest` at a complete checkpoint; folders newer than `latest` are leftovers and are removed at start.
A checkpoint of another layout (tp, dp) is resharded by reshard.py when it is loaded.

Design choice: `latest` is ours, not DeepSpeed's (saved with save_latest=False), because DeepSpeed's is
written before our per-rank files exist. Resuming checks the saved identity (model, tokenizer, data,
teacher cache, loss, micro-batch and global batch, seed) against the new run's and refuses any difference
by name; settings that may change between attempts (steps, lr, logging, eval, and the layout: dp, tp and
grad_accumulation, resharded by reshard.py) are not part of it. The cost:
each checkpoint holds fp32 master weights and Adam moments (12 bytes per parameter, spread over ranks).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.parallel import ParallelContext
from pipeline.train.errors import TrainError
from tokenization.format import fsync_dir, write_atomic

LATEST = "latest"
RUN_FILE = "run.json"
TRAINER_DIR = "trainer"


def tag_of(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step_"))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def upgraded_identity(saved: dict) -> dict:
    """An identity as run_identity writes it now: older checkpoints held the layout and grad_accumulation
    instead of the global batch."""
    if "layout" not in saved:
        return saved
    batch, dp = saved.get("batch", {}), saved["layout"].get("dp", 1)
    saved = {key: value for key, value in saved.items() if key != "layout"}
    if "grad_accumulation" in batch:
        micro = batch.get("micro_batch")
        saved["batch"] = {"micro_batch": micro, "global_batch": micro * batch["grad_accumulation"] * dp}
    return saved


def identity_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved X, now Y' for every identity entry that differs."""
    saved = upgraded_identity(saved)
    keys = sorted(set(saved) | set(current))
    return [f"{key}: saved {saved.get(key)!r}, now {current.get(key)!r}"
            for key in keys if saved.get(key) != current.get(key)]


class CheckpointStore:
    """The checkpoints folder of one run, as seen by one rank of `ctx`."""

    def __init__(self, root: str | Path, ctx: ParallelContext):
        self.root, self.ctx = Path(root), ctx

    def latest(self) -> str | None:
        """The tag `latest` names, or None for a run with no complete checkpoint."""
        path = self.root / LATEST
        if not path.is_file():
            return None
        tag = path.read_text().strip()
        if not (self.root / tag / RUN_FILE).is_file():
            raise TrainError(f"{path} names {tag!r}, but {self.root / tag / RUN_FILE} does not exist; the "
                             "checkpoints folder was changed by hand. Point latest at a complete checkpoint.")
        return tag

    def run_record(self, tag: str) -> dict:
        return json.loads((self.root / tag / RUN_FILE).read_text())

    def check_identity(self, tag: str, identity: dict) -> None:
        """Refuse to resume `tag` when it was saved by a run with another identity."""
        differ = identity_differences(self.run_record(tag).get("identity", {}), identity)
        if differ:
            raise TrainError(f"{self.root / tag}: this checkpoint belongs to another run; refusing to resume. "
                             "Differences: " + "; ".join(differ) + ". Use a new run_dir, or restore the settings.")

    def sweep_incomplete(self) -> None:
        """Rank 0 removes checkpoint folders newer than `latest` (a save that did not finish) and the leftovers
        of a resume on another layout that did not finish (reshard.py's `.reshard-*` folders)."""
        if self.ctx.rank == 0 and self.root.is_dir():
            latest = self.latest()
            newest = -1 if latest is None else step_of(latest)
            for folder in self._tags():
                if step_of(folder.name) > newest:
                    shutil.rmtree(folder)
            for folder in self.root.glob(".reshard-*"):
                shutil.rmtree(folder)
        self._barrier()

    def save(self, engine, step: int, record: dict, rank_state: dict, *, keep: int) -> str:
        """Save on every rank (collective); returns the tag. `record` goes into run.json (rank 0)."""
        tag = tag_of(step)
        folder = self.root / tag
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        own = folder / TRAINER_DIR / f"rank_{self.ctx.rank:05d}.pt"
        own.parent.mkdir(parents=True, exist_ok=True)
        torch.save(rank_state, own)
        self._fsync_own(folder, own)
        self._barrier()
        if self.ctx.rank == 0:
            write_atomic(folder / RUN_FILE, json.dumps({**record, "step": step}, indent=2, default=str).encode())
            write_atomic(self.root / LATEST, tag.encode())
            self._prune(keep)
        self._barrier()
        return tag

    def load(self, engine, tag: str) -> dict:
        """Load `tag` into `engine` (collective) and return this rank's trainer state."""
        own = self.root / tag / TRAINER_DIR / f"rank_{self.ctx.rank:05d}.pt"
        if not own.is_file():
            raise TrainError(f"{own} is missing: {tag} is damaged (a save that did not finish on every rank)")
        path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise TrainError(f"DeepSpeed could not load {self.root / tag}")
        return torch.load(own, weights_only=False)

    def _fsync_own(self, folder: Path, own: Path) -> None:
        pattern = f"zero_pp_rank_{self.ctx.dp_rank}_mp_rank_{self.ctx.tp_rank:02d}_"
        mine = [p for p in folder.iterdir() if p.name.removeprefix("bf16_").startswith(pattern)]  # bf16 runs
        for path in [own, *mine]:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(folder)
        fsync_dir(own.parent)

    def _tags(self) -> list[Path]:
        tags = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_")]
        return sorted(tags, key=lambda p: step_of(p.name))

    def _prune(self, keep: int) -> None:
        complete = [p for p in self._tags() if (p / RUN_FILE).is_file()]
        for folder in complete[:-keep]:
            shutil.rmtree(folder)

    def _barrier(self) -> None:
        if self.ctx.world_size > 1:
            dist.barrier()

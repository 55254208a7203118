"""One training run, start to end: check, build, resume, loop, evaluate, checkpoint, stop.

`run_training(cfg)` is what `distill train` and launchers/train_student.py call in every process of
`world = dp × tp`. It returns the process's exit status: 0 when the run reached `schedule.steps`,
`REQUEUE_EXIT_CODE` when it saved a checkpoint because it was asked to stop; errors raise.

Design choice: everything a restart needs is in the checkpoint (weights, optimizer, schedule, data
cursors, RNG, counters), and a restart is the same command, so a job killed at any moment and started
again continues from `latest` with nothing seen twice or skipped, on the same or another layout (tp, dp:
reshard.py, with grad_accumulation adjusted to keep the global batch); the cost is that work since the
last checkpoint is redone (checkpoint.every bounds it).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pipeline.config import TrainConfig, config_to_dict, dump_yaml
from pipeline.parallel import ParallelContext
from pipeline.train import reshard
from pipeline.train.checkpoints import TRAINER_DIR, CheckpointStore, rng_state, set_rng_state, step_of
from pipeline.train.engine import StudentStep, build_engine
from pipeline.train.errors import TrainError
from pipeline.train.evaluate import Evaluator
from pipeline.train.init_from import resolve_init
from pipeline.train.monitor import Monitor, memory_gib
from pipeline.train.preemption import REQUEUE_EXIT_CODE, StopRequest
from pipeline.train.setup import check_settings, open_teacher, prefix_sampler, run_identity
from pipeline.train.stream import TrainStream
from tokenization.format import write_atomic


def run_training(cfg: TrainConfig) -> int:
    """Train in this process (one rank of world = dp × tp); the exit status (0 or REQUEUE_EXIT_CODE)."""
    cfg = resolve_init(cfg)  # the architecture of model.init, before any check reads cfg.model
    check_settings(cfg)
    ctx = ParallelContext.from_env(cfg.parallel.tp, cfg.parallel.backend, cfg.parallel.timeout_minutes)
    try:
        ctx.seed(cfg.seed)
        return TrainingRun(cfg, ctx).execute()
    finally:
        ctx.destroy()


class TrainingRun:
    """The state of one attempt of a run on this rank."""

    def __init__(self, cfg: TrainConfig, ctx: ParallelContext):
        self.cfg, self.ctx = cfg, ctx
        self.run_dir = Path(cfg.run_dir)
        self.store = CheckpointStore(self.run_dir / "checkpoints", ctx)
        self.resume_tag, self.record, self.notes = self._latest(), None, []
        if self.resume_tag is not None:
            self.record = self.store.run_record(self.resume_tag)
            self.cfg = cfg = self._resume_batch(cfg)
        self.stream = TrainStream(cfg, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
        self.teacher = open_teacher(cfg, ctx)
        self.identity = run_identity(cfg, ctx, self.stream, self.teacher)
        if self.resume_tag is not None:  # before building anything: a foreign checkpoint fails fast
            self.store.check_identity(self.resume_tag, self.identity)
        self.step, self.nonfinite, self.consumed_tokens = 0, 0, 0
        self.evaluator = Evaluator(cfg, ctx) if cfg.data.eval_tokens else None
        init = cfg.model.init if self.resume_tag is None else ""
        self.engine, self.ds_config = build_engine(cfg, ctx, init=init)
        self.student = StudentStep(cfg, ctx, self.engine, self.teacher, prefix_sampler(cfg, ctx, self.teacher))

    def execute(self) -> int:
        resumed = self._resume()
        self._write_run_files()
        self.monitor = Monitor(self.run_dir, active=self.ctx.rank == 0, total_steps=self.cfg.schedule.steps,
                               start_step=self.step, console_every=self.cfg.log.console_every,
                               tensorboard=self.cfg.log.tensorboard, console=self.cfg.log.progress,
                               config_text=dump_yaml(self.cfg))
        try:
            self.monitor.message(f"{'resumed from ' + resumed if resumed else 'started'}: {self.ctx.describe()}")
            for note in self.notes:
                self.monitor.message(note)
            if self.cfg.model.init:
                self.monitor.message(f"model.init={self.cfg.model.init} ignored: resuming from the run's own "
                                     f"checkpoint" if resumed else f"initialised from model.init={self.cfg.model.init}")
            return self._loop()
        finally:
            self.stream.close()
            self.monitor.close()
            self.engine.destroy()

    def _loop(self) -> int:
        cfg = self.cfg
        with StopRequest() as stop:
            while self.step < cfg.schedule.steps:
                self._train_one()
                if self._due(cfg.eval.every) and self.evaluator is not None:
                    self.monitor.eval_step(self.step, self.evaluator.run(self.student))
                if self.step < cfg.schedule.steps and stop.agreed(self.ctx.device):
                    self._save("preempted")
                    self.monitor.message(f"stop requested (signal {stop.signal}); saved step {self.step}, exiting "
                                         f"with {REQUEUE_EXIT_CODE} to be requeued")
                    return REQUEUE_EXIT_CODE
                if self.step < cfg.schedule.steps and self._due(cfg.checkpoint.every):
                    self._save("every")
        if self.resume_tag is None or self.step > step_of(self.resume_tag):  # else latest holds it (any layout)
            self._save("end")
        return 0

    def _due(self, every: int) -> bool:
        return self.step == self.cfg.schedule.steps or (every > 0 and self.step % every == 0)

    def _train_one(self) -> None:
        start = time.perf_counter()
        batches = self.stream.next_step()
        result = self.student.run(batches.micro_batches, self.step)
        self.step += 1
        self.consumed_tokens += result.tokens
        if result.skipped:
            self.nonfinite += 1
            self.monitor.message(f"step {self.step}: non-finite loss or gradient, update skipped "
                                 f"({self.nonfinite} of at most {self.cfg.schedule.max_nonfinite_steps})")
            if self.nonfinite > self.cfg.schedule.max_nonfinite_steps:
                raise TrainError(f"{self.nonfinite} steps had a non-finite loss or gradient, more than "
                                 f"schedule.max_nonfinite_steps={self.cfg.schedule.max_nonfinite_steps}; stopped at "
                                 f"step {self.step}. Lower optim.lr, check the data, or resume from an earlier "
                                 f"checkpoint in {self.store.root}")
        seconds = time.perf_counter() - start
        self.monitor.train_step(self.step, self._scalars(result, seconds, batches.wait_s))

    def _scalars(self, result, seconds: float, wait_s: float) -> dict:
        values = {f"train/{name}": value for name, value in result.values.items()
                  if self.teacher is not None or name != "top1_agreement"}  # top-1 agreement with the teacher
        values.update({
            "train/lr": result.lr, "train/grad_norm": result.grad_norm,
            "train/skipped_steps": float(self.nonfinite),
            "perf/tokens_per_s": result.tokens / max(seconds, 1e-9), "perf/step_time_s": seconds,
            "perf/data_wait_fraction": wait_s / max(seconds, 1e-9), "perf/memory_gib": memory_gib(self.ctx.device),
            "data/consumed_tokens": float(self.consumed_tokens),
            "data/epoch": self.step / max(self.stream.steps_per_epoch, 1)})
        if hasattr(self.teacher, "take_seconds"):  # an online teacher: its forward time, apart from the student's
            values["perf/teacher_s"] = self.teacher.take_seconds()
        for name, value in self.student.times.items():
            values[f"perf/{name}" if name.endswith("_s") else f"data/{name}"] = value
        return values

    # ---- checkpoints

    def _rank_state(self) -> dict:
        return {"step": self.step, "nonfinite": self.nonfinite, "consumed_tokens": self.consumed_tokens,
                "data": self.stream.state_dict(), "rng": rng_state()}

    def _save(self, reason: str) -> None:
        record = {"config": json.loads(json.dumps(config_to_dict(self.cfg))), "identity": self.identity,
                  "layout": {"world": self.ctx.world_size, "tp": self.ctx.tp_size, "dp": self.ctx.dp_size},
                  "reason": reason, "consumed_tokens": self.consumed_tokens}
        tag = self.store.save(self.engine, self.step, record, self._rank_state(), keep=self.cfg.checkpoint.keep)
        self.monitor.message(f"saved checkpoint {tag} ({reason})")

    def _latest(self) -> str | None:
        self.store.sweep_incomplete()
        return self.store.latest()

    def _resume_batch(self, cfg: TrainConfig) -> TrainConfig:
        """`cfg` with the grad_accumulation that keeps the checkpoint's global batch at this run's dp."""
        g = reshard.resume_grad_accumulation(cfg, self.record, self.ctx.dp_size)
        if g == cfg.schedule.grad_accumulation:
            return cfg
        self.notes.append(f"schedule.grad_accumulation={g} instead of {cfg.schedule.grad_accumulation}: keeps the "
                          f"checkpoint's global batch at dp={self.ctx.dp_size}")
        return reshard.with_grad_accumulation(cfg, g)

    def _resume(self) -> str | None:
        tag = self.resume_tag
        if tag is None:
            return None
        tp, dp = reshard.saved_layout(self.record)
        if (tp, dp) == (self.ctx.tp_size, self.ctx.dp_size):
            state = self.store.load(self.engine, tag)
        else:
            state = reshard.resume(self.store, tag, self.record, self.engine, self.cfg, self.ctx, TRAINER_DIR)
            self.notes.append(f"resharded {tag} from tp={tp} × dp={dp} to tp={self.ctx.tp_size} × "
                              f"dp={self.ctx.dp_size}")
        self.step, self.nonfinite = int(state["step"]), int(state["nonfinite"])
        self.consumed_tokens = int(state["consumed_tokens"])
        self.stream.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        return str(self.store.root / tag)

    def _write_run_files(self) -> None:
        if self.ctx.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "config.yaml", dump_yaml(self.cfg).encode())
            write_atomic(self.run_dir / "deepspeed.json", json.dumps(self.ds_config, indent=2).encode())
        if self.ctx.world_size > 1:
            torch.distributed.barrier()

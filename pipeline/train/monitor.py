"""What a person watching a training run sees: TensorBoard curves, a metrics.jsonl twin and console lines.

The trainer builds one `Monitor` on every rank; only global rank 0 passes `active=True`, and on every other rank
each method returns at once and nothing is created, so there is exactly one writer and no file contention.

Resume: a run killed after checkpoint k may already have logged steps beyond k. A resumed Monitor
(`start_step=k`, the number of optimizer steps already done) opens its SummaryWriter with `purge_step=k + 1`:
TensorBoard's own reader then drops every older event with step > k, so the resumed curves continue without
zig-zags; and it rewrites metrics.jsonl atomically keeping only records with step <= k. (Steps are 1-based, the
step a record belongs to is the step just completed, so step k itself belongs to the checkpoint and is kept.)

metrics.jsonl is a plain-text twin of the scalars for scripts and tests; it is flushed every line, so a crash
loses at most the line being written. Cost: one small JSON line and one TensorBoard event per tag per step on
rank 0 (the writer queues in memory and flushes in a background thread), the jsonl rewrite reads the whole
file once on resume, and the console line is built from pure functions that are unit-tested without a writer.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections import deque
from pathlib import Path

from tokenization.format import write_atomic

ETA_WINDOW = 50  # steps in the moving average of step time behind the ETA


def format_duration(seconds: float) -> str:
    """`h:mm:ss` with unbounded hours; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = round(seconds)
    return f"{total // 3600}:{total // 60 % 60:02d}:{total % 60:02d}"


def eta_seconds(recent_step_times: list[float], steps_left: int) -> float | None:
    """Steps left times the mean of the recent step times; None before any step time is known."""
    if not recent_step_times:
        return None
    return max(steps_left, 0) * sum(recent_step_times) / len(recent_step_times)


def format_train_line(step: int, total_steps: int, scalars: dict[str, float], eta_s: float | None) -> str:
    """One readable console line for a train step; a part is left out when its tag was not logged."""
    width = len(str(total_steps))
    parts = [f"step {step:>{width}}/{total_steps}"]
    if "train/loss" in scalars:
        loss = f"loss {scalars['train/loss']:.3f}"
        terms = [f"{name} {scalars[f'train/{name}_loss']:.3f}" for name in ("kd", "ce", "hidden")
                 if f"train/{name}_loss" in scalars]
        parts.append(loss + (f" ({' '.join(terms)})" if terms else ""))
    if "train/top1_agreement" in scalars:
        parts.append(f"top1 {scalars['train/top1_agreement']:.3f}")
    if "train/lr" in scalars:
        parts.append(f"lr {scalars['train/lr']:.1e}")
    if "perf/tokens_per_s" in scalars:
        parts.append(f"{scalars['perf/tokens_per_s']:,.0f} tok/s")
    if "perf/data_wait_fraction" in scalars:
        parts.append(f"wait {100 * scalars['perf/data_wait_fraction']:.0f}%")
    if scalars.get("train/skipped_steps", 0):
        parts.append(f"skipped {scalars['train/skipped_steps']:,.0f}")
    parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def format_eval_line(step: int, scalars: dict[str, float]) -> str:
    """One console line for an evaluation, e.g. 'eval @ step 500 | ppl 31.2 | div 0.412 | top1 0.450'."""
    parts = [f"eval @ step {step}"]
    for tag, label, fmt in (("eval/perplexity", "ppl", ".1f"), ("eval/loss", "loss", ".3f"),
                            ("eval/divergence", "div", ".3f"), ("eval/top1_agreement", "top1", ".3f"),
                            ("eval/r_llh", "R_llh", ".3f"), ("eval/r_cvg", "R_cvg", ".3f")):
        if tag in scalars:
            parts.append(f"{label} {scalars[tag]:{fmt}}")
    return " | ".join(parts)


def memory_gib(device) -> float:
    """Peak memory in GiB: CUDA's max allocated on a CUDA device, else this process's peak RSS."""
    import torch  # here, not at the top: the quickstart's report and so `distill --help` import this module

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def read_scalars(tensorboard_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a TensorBoard log directory, read with TensorBoard's own reader (purges applied)."""
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(str(tensorboard_dir), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl in order; a torn last line (killed mid-write) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(run_dir: Path, keep_through: int) -> None:
    """Rewrite metrics.jsonl atomically with only the records whose step is <= keep_through."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= keep_through]
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


class Monitor:
    """TensorBoard + metrics.jsonl + console for one run; every method is a no-op unless `active`."""

    def __init__(self, run_dir: Path, *, active: bool, total_steps: int, start_step: int, console_every: int,
                 tensorboard: bool, console: bool, config_text: str, stream=sys.stdout):
        self.active = active
        self.total_steps, self.start_step = total_steps, start_step
        self.console_every = max(1, console_every)
        self.console, self.stream = console, stream
        self._writer, self._jsonl = None, None
        self._step_times: deque[float] = deque(maxlen=ETA_WINDOW)
        self._last_step, self._last_time, self._window_is_warmup = None, None, False
        if not active:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if start_step > 0:
            truncate_metrics(self.run_dir, keep_through=start_step)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - open for the run, closed by close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), flush_secs=30,
                                         purge_step=start_step + 1 if start_step > 0 else None)
            self._writer.add_text("config", f"```\n{config_text}\n```", global_step=start_step)

    def _record(self, step: int, kind: str, scalars: dict[str, float]) -> dict[str, float]:
        values = {tag: float(v) for tag, v in scalars.items()}
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, global_step=step)
        self._jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self._jsonl.flush()
        return values

    def _observe_step_time(self, step: int, values: dict[str, float]) -> None:
        """Feed the ETA window: the logged step time if any, else wall time since the last call per step."""
        now = time.monotonic()
        if "perf/step_time_s" in values:
            per_step = values["perf/step_time_s"]
        elif self._last_step is not None and step > self._last_step:
            per_step = (now - self._last_time) / (step - self._last_step)
        else:
            per_step = None
        self._last_step, self._last_time = step, now
        if per_step is None:
            return
        if self._window_is_warmup:  # the first timed step (warm-up, compilation) counts only until another
            self._step_times.clear()
            self._window_is_warmup = False
        elif not self._step_times:
            self._window_is_warmup = True
        self._step_times.append(per_step)

    def train_step(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        values = self._record(step, "train", scalars)
        self._observe_step_time(step, values)
        if self.console and (step % self.console_every == 0 or step == self.total_steps):
            eta = eta_seconds(list(self._step_times), self.total_steps - step)
            self._print(format_train_line(step, self.total_steps, values, eta))

    def eval_step(self, step: int, scalars: dict[str, float]) -> None:
        if not self.active:
            return
        values = self._record(step, "eval", scalars)
        if self._writer is not None:
            self._writer.flush()
        if self.console:
            self._print(format_eval_line(step, values))

    def message(self, text: str) -> None:
        if self.active and self.console:
            self._print(text)

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

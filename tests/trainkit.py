"""Tiny training runs for the trainer's tests: a teacher cache made here, overrides for a small student.

`teacher_cache(folder, tokens)` saves a random Hugging Face teacher (tests/modelmaker.py) and runs the
real cache job over the token shards; `student_overrides(...)` are `distill train` overrides for a
student small enough that a step takes milliseconds on one CPU core. `final_weights(run_dir)` exports
a run's latest checkpoint and reads its tensors back, to compare runs parameter by parameter.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.train.monitor import read_metrics
from tests.modelmaker import VOCAB, make_hf_model, read_safetensors

STUDENT = ["model.vocab_size=300", "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
           "model.num_heads=4", "model.num_kv_heads=2", "compute.vocab_multiple=64"]


def teacher_cache(folder: Path, tokens: Path, *, mode: str = "topk", k: int = 8, seed: int = 0,
                  temperature: float = 1.0) -> Path:
    """The cache of `tokens` by a random llama_gqa teacher (vocab 300), in `folder`/cache_<mode>[_T<temperature>]."""
    from pipeline.config import CacheConfig, from_dict
    from pipeline.teacher.job import run_cache

    teacher = folder / "teacher"
    if not teacher.exists():
        make_hf_model("llama_gqa", teacher, seed=seed)
    out = folder / (f"cache_{mode}" if temperature == 1.0 else f"cache_{mode}_T{temperature:g}")
    cfg = from_dict(CacheConfig, {"teacher": str(teacher), "tokens": str(tokens), "output": str(out),
                                  "progress": False, "targets": {"mode": mode, "k": k, "draws": 16,
                                                                 "temperature": temperature}})
    run_cache(cfg)
    return out


def student_overrides(run_dir: Path, tokens: Path, cache: Path | None = None, *, steps: int = 6,
                      micro_batch: int = 2, grad_accumulation: int = 1, tp: int = 1, **extra) -> list[str]:
    """`distill train` overrides for the small student; `extra` as key=value (dots as double underscores)."""
    out = STUDENT + [f"run_dir={run_dir}", f"data.tokens={tokens}", f"schedule.steps={steps}",
                     f"schedule.micro_batch={micro_batch}", f"schedule.grad_accumulation={grad_accumulation}",
                     f"parallel.tp={tp}", "data.num_workers=0", "optim.warmup_steps=2", "optim.lr=0.01",
                     "log.progress=false", "checkpoint.every=0", "eval.every=0"]
    out += [f"data.teacher_cache={cache}", "loss.divergence=kl"] if cache else ["loss.divergence=ce"]
    out += [f"{key.replace('__', '.')}={value}" for key, value in extra.items()]
    return out


def train_config(overrides: list[str]):
    from pipeline.config import TrainConfig, load_config

    return load_config(TrainConfig, None, overrides)


def losses(run_dir: Path, tag: str = "train/loss") -> dict[int, float]:
    """{step: value} of `tag` from a run's metrics.jsonl."""
    return {row["step"]: row[tag] for row in read_metrics(run_dir) if tag in row}


def final_weights(run_dir: Path, out: Path) -> dict:
    """The tensors of the run's latest checkpoint, exported as a Hugging Face folder at `out`."""
    from pipeline.train.export import export_checkpoint

    export_checkpoint(run_dir, out, progress=False)
    return read_safetensors(out)


assert VOCAB == 300  # STUDENT's vocab_size matches the teacher's


def launch(overrides: list[str], world: int = 1, *, log_dir: Path | None = None) -> list:
    """`python -m pipeline train` as `world` processes with torchrun's variables set (as srun-style ranks
    would be), each process's output in log_dir/rank_N.log. Returns the Popen objects."""
    import os
    import subprocess
    import sys

    from tests.harness import free_port

    root = Path(__file__).resolve().parents[1]
    port, procs = free_port(), []
    log_dir = Path(log_dir or overrides_run_dir(overrides).parent)
    log_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(root), OMP_NUM_THREADS="1")
        log = open(log_dir / f"{overrides_run_dir(overrides).name}_rank_{rank}.log", "ab")
        procs.append(subprocess.Popen([sys.executable, "-m", "pipeline", "train", *overrides], cwd=root, env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def overrides_run_dir(overrides: list[str]) -> Path:
    return Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")))


def logged_steps(run_dir: Path) -> int:
    """The last train step in metrics.jsonl (0 when none yet)."""
    return max((row.get("step", 0) for row in read_metrics(run_dir)), default=0)


def wait_for(procs, until, what: str, timeout: float = 240) -> None:
    """Poll `until()` while the processes `procs` run; fail the test when they end first or after `timeout` s."""
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while not until():
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"the run ended before {what} (exit {[p.poll() for p in procs]})")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)

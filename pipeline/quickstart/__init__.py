"""`distill quickstart`: the whole pipeline end to end on the shipped Austen corpus, on one CPU machine.

Tokenizer → token shards (train, held-out) → a teacher trained on labels → its top-K and sampled caches →
the same student trained once per loss (CE baseline, KL, RKL, JS, TVD, sampled KL) for the same budget →
a results table (Markdown, CSV), a plot of the curves, TensorBoard logs of every run and the best distilled
student exported as a Hugging Face folder. The stages are ordinary `distill` commands (plan.py) run one by
one (runner.py); the comparison is read back from the runs' metrics (report.py).

Design choice: the run folder is bound to its resolved config (OUT/quickstart.yaml), so rerunning the same
command after a crash or Ctrl-C finishes what is missing, and a changed config is refused rather than
mixed with the old runs.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

from pipeline.config import ConfigError, config_to_dict, dump_yaml, load_config
from pipeline.quickstart.plan import BASELINE, TEACHER, build_plan, student_runs
from pipeline.quickstart.report import Result, plot_curves, read_result, with_ratios, write_tables
from pipeline.quickstart.runner import StageFailed, StageRunner
from pipeline.quickstart.settings import QuickstartConfig

__all__ = ["QuickstartConfig", "StageFailed", "run_quickstart"]


def run_quickstart(cfg: QuickstartConfig, out: Path, command: str, console: TextIO = sys.stdout) -> list[Result]:
    """Run (or finish) the quickstart into `out`; the results, teacher first."""
    started = time.monotonic()
    out = Path(out).resolve()
    _bind_folder(cfg, out)
    labels = {TEACHER: "teacher: CE on labels"} | {run.name: run.label for run in student_runs(cfg)}
    runner = StageRunner(out, console)
    seconds = runner.run_all(build_plan(cfg, out, pick_student=lambda: _best_distilled(out, cfg, labels)))
    results = with_ratios(_results(out, labels, seconds), BASELINE)
    table = write_tables(out, results, command, time.monotonic() - started)
    plot_curves(out, labels, TEACHER)
    best = min((r for r in results if r.run not in (TEACHER, BASELINE)), key=lambda r: r.heldout_ppl, default=None)
    print(f"\n{table}\nIn {out}:\n  results.md, results.csv, loss_curves.png\n"
          f"  student_hf/  the best distilled student ({best.run if best else BASELINE}), a Hugging Face folder\n"
          f"  runs/        every run's checkpoints, metrics.jsonl and TensorBoard events:\n"
          f"               tensorboard --logdir {out / 'runs'}\n"
          f"  configs/, commands.sh, logs/   what each stage ran, to rerun or change by hand", file=console)
    return results


def _results(out: Path, labels: dict[str, str], seconds: dict[str, float]) -> list[Result]:
    return [read_result(out / "runs" / name, name, label, seconds.get(name, 0.0)) for name, label in labels.items()]


def _best_distilled(out: Path, cfg: QuickstartConfig, labels: dict[str, str]) -> str:
    """The distilled student with the lowest held-out perplexity."""
    names = [run.name for run in student_runs(cfg) if run.name != BASELINE] or [BASELINE]
    return min(names, key=lambda name: read_result(out / "runs" / name, name, labels[name], 0.0).heldout_ppl)


def _bind_folder(cfg: QuickstartConfig, out: Path) -> None:
    """Record the config in out/quickstart.yaml, or refuse a folder made with another config."""
    record = out / "quickstart.yaml"
    if record.exists():
        before = config_to_dict(load_config(QuickstartConfig, record))
        now = config_to_dict(cfg)
        changed = [key for key in _flat(now) if _flat(before).get(key) != _flat(now)[key]]
        if changed:
            listed = ", ".join(f"{key}: {_flat(before).get(key)} → {_flat(now)[key]}" for key in changed)
            raise ConfigError(changed[0], f"{out} holds a quickstart made with another config ({listed}); "
                                          "use another --out, or delete the folder to start again")
        return
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(dump_yaml(cfg))


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat

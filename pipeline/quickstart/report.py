"""The quickstart's results: one row per trained model from its metrics.jsonl, as Markdown, CSV and a PNG.

Design choice: everything is read back from the runs' own metrics.jsonl (the trainer's plain-text twin of
its TensorBoard events), so the table shows exactly what the trainer measured and can be rebuilt from a
finished run folder (rerunning the same command skips every finished stage and writes the report
again). Every student is compared on the same ruler: held-out perplexity, forward KL(teacher ‖ student)
and top-1 agreement on the same held-out samples, whatever its training loss was.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import os
import platform
import statistics
from pathlib import Path

from pipeline.train.monitor import read_metrics

COLUMNS = ("run", "loss", "heldout_ppl", "vs_ce", "kl_to_teacher", "top1_agreement", "r_llh", "r_cvg",
           "tokens_per_s", "train_s")
HEADINGS = ("run", "trained with", "held-out ppl", "ppl vs CE", "KL(teacher‖student)", "top-1 agreement",
            "R_llh", "R_cvg", "tokens/s", "train time (s)")


@dataclasses.dataclass(frozen=True)
class Result:
    """The last held-out eval and the throughput of one run."""

    run: str
    loss: str
    heldout_ppl: float
    kl_to_teacher: float | None
    top1_agreement: float | None
    tokens_per_s: float
    train_s: float
    vs_ce: float | None = None
    r_llh: float | None = None
    r_cvg: float | None = None


def read_result(run_dir: Path, name: str, label: str, seconds: float) -> Result:
    """The Result of the run in `run_dir`; an error naming the file when it has no final eval."""
    rows = read_metrics(run_dir)
    evals = [row for row in rows if row.get("kind") == "eval"]
    if not evals:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no eval record; the run did not finish")
    last = evals[-1]
    speeds = [row["perf/tokens_per_s"] for row in rows if row.get("kind") == "train" and row["step"] > 1]
    return Result(name, label, last["eval/perplexity"], last.get("eval/divergence"), last.get("eval/top1_agreement"),
                  statistics.median(speeds) if speeds else 0.0, seconds, r_llh=last.get("eval/r_llh"),
                  r_cvg=last.get("eval/r_cvg"))


def with_ratios(results: list[Result], baseline: str) -> list[Result]:
    """The results with each perplexity's ratio to the baseline run's."""
    base = next(r.heldout_ppl for r in results if r.run == baseline)
    return [dataclasses.replace(r, vs_ce=r.heldout_ppl / base) for r in results]


def _cells(result: Result) -> list[str]:
    def number(value, fmt):
        return "" if value is None else format(value, fmt)

    return [result.run, result.loss, number(result.heldout_ppl, ".2f"), number(result.vs_ce, ".3f"),
            number(result.kl_to_teacher, ".4f"), number(result.top1_agreement, ".3f"),
            number(result.r_llh, ".3f"), number(result.r_cvg, ".3f"),
            number(result.tokens_per_s, ",.0f"), number(result.train_s, ".0f")]


def markdown_table(results: list[Result]) -> str:
    lines = ["| " + " | ".join(HEADINGS) + " |", "|" + "---|" * len(HEADINGS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in results]
    return "\n".join(lines) + "\n"


def machine() -> str:
    """This machine in one line: CPU model, cores, OS, Python and torch versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {cores} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def write_tables(out: Path, results: list[Result], command: str, total_s: float) -> str:
    """results.md and results.csv under `out`; returns the Markdown."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"# Quickstart results\n\n{markdown_table(results)}\n"
            f"Held-out: the same samples for every run. KL and top-1 agreement are against the teacher's "
            f"cached top-K targets. R_llh (likelihood risk: −log p_teacher over the student's samples, high = "
            f"mode averaging) and R_cvg (coverage risk: −log q_student over the teacher's samples, high = mode "
            f"collapse) are f-DISTILL's, in nats per token, from held-out prompts sampled at top-k 30, T = 1. "
            f"tokens/s is the median training throughput.\n\n"
            f"- date: {stamp}\n- machine: {machine()}\n- command: `{command}`\n"
            f"- wall time: {total_s / 60:.1f} min (all stages)\n")
    (out / "results.md").write_text(text)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in results:
        writer.writerow([r.run, r.loss, r.heldout_ppl, r.vs_ce, r.kl_to_teacher, r.top1_agreement, r.r_llh, r.r_cvg,
                         round(r.tokens_per_s, 1), round(r.train_s, 2)])
    (out / "results.csv").write_text(buffer.getvalue())
    return text


def plot_curves(out: Path, runs: dict[str, str], teacher: str) -> Path:
    """loss_curves.png: held-out perplexity and training cross-entropy per step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (heldout, train) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for name, label in runs.items():
        rows = read_metrics(out / "runs" / name)
        evals = [(r["step"], r["eval/perplexity"]) for r in rows if r.get("kind") == "eval"]
        ce = [(r["step"], r["train/ce_loss"]) for r in rows if r.get("kind") == "train"]
        if name == teacher:
            heldout.axhline(evals[-1][1], color="black", linestyle="--", label=f"{label} (final)")
            continue
        heldout.plot(*zip(*evals), marker="o", label=label)
        train.plot(*zip(*_smooth(ce)), label=label)
    heldout.set(title="held-out perplexity", xlabel="step", ylabel="perplexity", yscale="log")
    train.set(title="training cross-entropy on labels (smoothed)", xlabel="step", ylabel="nats / token")
    heldout.legend(fontsize=8)
    train.legend(fontsize=8)
    figure.tight_layout()
    path = out / "loss_curves.png"
    figure.savefig(path)
    plt.close(figure)
    return path


def _smooth(points: list[tuple[int, float]], window: int = 10) -> list[tuple[int, float]]:
    smoothed = []
    for i, (step, _) in enumerate(points):
        recent = [value for _, value in points[max(0, i - window + 1):i + 1]]
        smoothed.append((step, sum(recent) / len(recent)))
    return smoothed

"""`distill quickstart --smoke` end to end, through the real command, and every artefact it promises.

The smoke run goes through `make demo` (as the README says to start it): the quickstart's glue and its main
stages (tokenizer, shards, teacher, its top-K caches, three students, export; LEANER says what it leaves out)
on one novel with tiny models and short runs: about a minute on 2 cores. Its numbers are not a result, but bounds computed from token
counts (uniform, unigram and bigram models) check that every model learnt and that eval measures honestly;
and each artefact exists and parses: the results table as Markdown and CSV
with a finite row per run, the PNG, TensorBoard events of every run read back with TensorBoard's own
reader, the exported student loaded by transformers with its tokenizer, and the record of the commands.
Then the same command again skips every stage and rewrites the report, and a changed config is refused
without touching the folder.
"""
from __future__ import annotations

import csv
import gzip
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipeline.train.monitor import read_scalars

ROOT = Path(__file__).resolve().parents[2]
RUNS = ["teacher", "ce", "kl", "js"]
LEANER = ["divergences=[kl,js]", "sampled=false", "pruned=false", "teacher_sampled.prompts=[]"]
"""What the test leaves out of `--smoke`: the sampled, pruned and teacher-sampled students' stages are tested
where they live (test_cache_job.py, test_prune_markov.py, test_cache_teacher_sampled.py), rkl and tvd run
js's code with another loss, and test_quickstart_plan.py checks every stage's config; the glue is the same."""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _quickstart(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "quickstart", "--smoke", "--out", str(out), *LEANER, *extra],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The smoke quickstart through the README's `make demo` (its arguments passed with DEMO_ARGS)."""
    out = tmp_path_factory.mktemp("quickstart") / "smoke"
    run = subprocess.run(["make", "-C", str(ROOT), "demo", f"DEMO_ARGS=--smoke --out {out} {' '.join(LEANER)}"], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return out, run


def test_smoke_run_finishes_and_prints_the_table(smoke):
    out, run = smoke
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[11/11] student_export" in run.stdout
    assert "| js | JS to top-8 + 0.5·CE, after 48 steps of KL |" in run.stdout


def test_results_csv_and_markdown_agree(smoke):
    out, _ = smoke
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["run"] for row in rows] == RUNS
    for row in rows:
        assert float(row["tokens_per_s"]) > 0 and float(row["train_s"]) > 0
        if row["run"] != "teacher":
            assert math.isfinite(float(row["kl_to_teacher"])) and 0 <= float(row["top1_agreement"]) <= 1
            assert 0 < float(row["r_llh"]) < 30 and 0 < float(row["r_cvg"]) < 30  # measured, in nats per token
    markdown = (out / "results.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0][2:] for line in table] == RUNS
    assert [f"{float(row['heldout_ppl']):.2f}" for row in rows] == [line.split(" | ")[2] for line in table]
    assert "- machine: " in markdown and "- date: " in markdown


def _token_ids(tokenizer, path: Path) -> list[int]:
    with gzip.open(path, "rt") as lines:
        return [i for line in lines for i in tokenizer.encode(json.loads(line)["text"]).ids]


def _count_baselines(out: Path) -> tuple[int, float, float]:
    """Vocabulary size, and the held-out perplexity of add-one unigram and bigram models counted on the training
    book: tokens come from the raw text through the `tokenizers` library, not from the pipeline's shards."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    train = _token_ids(tokenizer, ROOT / "data/austen/northanger_abbey.jsonl.gz")
    heldout = _token_ids(tokenizer, ROOT / "data/austen/persuasion.jsonl.gz")
    unigrams, bigrams = Counter(train), Counter(zip(train, train[1:]))
    unigram_nll = -sum(math.log((unigrams[t] + 1) / (len(train) + vocab)) for t in heldout) / len(heldout)
    bigram_nll = -sum(math.log((bigrams[p, t] + 1) / (unigrams[p] + vocab))
                      for p, t in zip(heldout, heldout[1:])) / (len(heldout) - 1)
    return vocab, math.exp(unigram_nll), math.exp(bigram_nll)


def test_models_learn_and_perplexity_is_measured_sanely(smoke):
    """Bounds from counts, not from the pipeline: every run beats the uniform model (perplexity = vocabulary size)
    by far, the teacher beats a unigram model of the training book, and no run beats the bigram model counted on
    the whole training book (190k tokens) after seeing at most 16k tokens: a lower perplexity means the eval
    leaks the answer (a broken causal mask, padding or shifted labels counted as text)."""
    out, _ = smoke
    vocab, unigram_ppl, bigram_ppl = _count_baselines(out)
    assert vocab == 512 and bigram_ppl < unigram_ppl < vocab / 2
    ppl = {row["run"]: float(row["heldout_ppl"]) for row in csv.DictReader((out / "results.csv").open())}
    assert ppl["teacher"] < 0.95 * unigram_ppl, (ppl, unigram_ppl)
    for run, value in ppl.items():
        assert bigram_ppl < value < 0.6 * vocab, (run, value, bigram_ppl)


def test_plot_is_a_png(smoke):
    out, _ = smoke
    data = (out / "loss_curves.png").read_bytes()
    assert data.startswith(PNG_MAGIC)
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 600 and height > 300


def test_every_run_has_tensorboard_events(smoke):
    out, _ = smoke
    for name in RUNS:
        scalars = read_scalars(out / "runs" / name / "tensorboard")
        assert "train/loss" in scalars and "eval/perplexity" in scalars, name
    assert "eval/divergence" in read_scalars(out / "runs" / "kl" / "tensorboard")


def test_exported_student_loads_with_its_tokenizer(smoke):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = smoke
    tokenizer = AutoTokenizer.from_pretrained(out / "student_hf")
    model = AutoModelForCausalLM.from_pretrained(out / "student_hf")
    ids = tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] >= len(tokenizer) and torch.isfinite(logits).all()


def test_commands_are_recorded(smoke):
    out, _ = smoke
    commands = (out / "commands.sh").read_text().splitlines()
    assert len(commands) == 11 and commands[0].startswith("distill tokenize train-tokenizer")
    assert sum(line.startswith("distill train --config") for line in commands) == 4
    assert len(list((out / "logs").glob("*.log"))) == 11


def test_rerun_skips_finished_stages_and_changed_config_is_refused(smoke):
    out, first = smoke
    before = {path: path.stat().st_mtime_ns for path in (out / "runs").rglob("*") if path.is_file()}
    again = _quickstart(out)
    assert again.returncode == 0, again.stdout[-2000:]
    assert again.stdout.count("(done in an earlier run, skipped)") == 11
    assert {path: path.stat().st_mtime_ns for path in before} == before
    refused = _quickstart(out, "student_run.steps=49")
    assert refused.returncode == 2
    assert "student_run.steps: 48 → 49" in refused.stderr

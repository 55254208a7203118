"""Distillation works: a student trained on a teacher's top-K targets beats the same student trained on labels.

The language is a seeded first-order Markov chain over 300 ids (tests/languagemaker.py): every id has 5
to 20 successors with Dirichlet weights, so the best possible perplexity is about 8.4 and a unigram model
sits near 260. A teacher (hidden 128, 2 layers) is trained here with the project's trainer on plain
next-token CE, exported to a Hugging Face folder and cached (top-16 + rest mass) over the training and
held-out shards by the real cache job. Then the small student (hidden 64) is trained twice on the same
budget (same shards, 60 steps of 8 samples, same schedule, same seed, so the same initial weights and
data order): once with CE on the labels, once with forward KL to the cached targets. Each position then
shows the KD student a whole next-token distribution instead of one draw from it, so from the same 480
samples it learns the transition table much better. Eval is the trainer's own, on all 256 held-out samples.

Why the margins do not flake: everything is seeded (language, shards, initial weights, data order, cache)
and runs in fp32 on CPU, so a rerun gives the same numbers up to float rounding. Measured over student
seeds 1-5 (language seed 0) and 1-2 (language seed 7), held-out perplexity was teacher 11.4-11.5, KD
15.5-15.8, CE 35.4-40.5: KD/CE between 0.39 and 0.44, so asking for KD < 0.7 × CE leaves a wide gap
either way; the KD student's KL to the teacher was 0.10-0.11 against the CE student's 0.84-0.99 (asked:
below half), and the teacher's perplexity was 26-27 % below the KD student's (asked: below it at all).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import run_distributed
from tests.languagemaker import MarkovLanguage, make_language_shards
from tests.trainkit import STUDENT, student_overrides, train_config

SEQ_LEN = 32
TEACHER = ["model.vocab_size=300", "model.hidden_size=128", "model.intermediate_size=256", "model.num_layers=2",
           "model.num_heads=4", "model.num_kv_heads=2", "compute.vocab_multiple=64"]
TEACHER_RUN = dict(steps=200, micro_batch=16, optim__lr=0.01, optim__warmup_steps=20)
STUDENT_RUN = dict(steps=60, micro_batch=8, optim__lr=0.01, optim__warmup_steps=5)
TRAIN_SAMPLES, HELDOUT_SAMPLES = [1000, 1000], [256]
TOP_K = 16
MARGIN = 0.3  # KD's held-out perplexity must be at least 30 % below CE's (measured: 56-61 % below)
SEED = 1


def _eval_row(run_dir: Path) -> dict:
    """The last eval row of a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [row for row in rows if row.get("kind") == "eval"][-1]


def _train(run_dir: Path, train: Path, heldout: Path, heldout_cache: Path | None, cache: Path | None = None, *,
           model: list[str] = STUDENT, **run) -> dict:
    """Train one model (CE without `cache`, KL to it with), evaluate it on all of `heldout`; its eval row."""
    from pipeline.train.run import run_training

    overrides = student_overrides(run_dir, train, cache, **run)[len(STUDENT):] + model
    overrides += [f"data.eval_tokens={heldout}", f"eval.batches={sum(HELDOUT_SAMPLES) // run['micro_batch']}",
                  "log.tensorboard=false"] + ([f"data.eval_teacher_cache={heldout_cache}"] if heldout_cache else [])
    assert run_training(train_config(overrides)) == 0
    return _eval_row(run_dir)


def _cache(teacher: Path, tokens: Path, out: Path) -> Path:
    from pipeline.config import CacheConfig, from_dict
    from pipeline.teacher.job import run_cache

    run_cache(from_dict(CacheConfig, {"teacher": str(teacher), "tokens": str(tokens), "output": str(out),
                                      "progress": False, "targets": {"mode": "topk", "k": TOP_K}}))
    return out


def _pipeline(rank: int, world: int, folder: Path, student_seeds: list[int]) -> dict:
    """Teacher, its export and caches, then a CE and a KD student per seed; {name: last eval row}."""
    from pipeline.train.export import export_checkpoint

    train, heldout = folder / "train", folder / "heldout"
    rows = {"teacher": _train(folder / "teacher", train, heldout, None, model=TEACHER, **TEACHER_RUN)}
    export_checkpoint(folder / "teacher", folder / "teacher_hf", progress=False)
    cache = _cache(folder / "teacher_hf", train, folder / "cache")
    heldout_cache = _cache(folder / "teacher_hf", heldout, folder / "cache_heldout")
    for seed in student_seeds:
        rows[f"ce_{seed}"] = _train(folder / f"ce_{seed}", train, heldout, heldout_cache, seed=seed, **STUDENT_RUN)
        rows[f"kd_{seed}"] = _train(folder / f"kd_{seed}", train, heldout, heldout_cache, cache, seed=seed,
                                    **STUDENT_RUN)
    return rows


def make_data(folder: Path, language_seed: int = 0) -> None:
    language = MarkovLanguage(300, seed=language_seed)
    make_language_shards(folder / "train", language, TRAIN_SAMPLES, seq_len=SEQ_LEN, seed=1)
    make_language_shards(folder / "heldout", language, HELDOUT_SAMPLES, seq_len=SEQ_LEN, seed=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Eval rows of the teacher and of the CE and KD students, trained in one spawned process."""
    folder = tmp_path_factory.mktemp("train_distillation")
    make_data(folder)
    rows = run_distributed(_pipeline, 1, folder, [SEED])[0]
    return {"teacher": rows["teacher"], "ce": rows[f"ce_{SEED}"], "kd": rows[f"kd_{SEED}"]}


def _ppl(runs: dict) -> dict:
    return {name: row["eval/perplexity"] for name, row in runs.items()}


def test_kd_student_beats_ce_student(runs):
    ppl = _ppl(runs)
    assert ppl["kd"] < ppl["ce"] * (1 - MARGIN), f"held-out perplexity: {ppl}"


def test_kd_student_is_closer_to_the_teacher(runs):
    kl = {name: runs[name]["eval/divergence"] for name in ("ce", "kd")}
    agree = {name: runs[name]["eval/top1_agreement"] for name in ("ce", "kd")}
    assert kl["kd"] < 0.5 * kl["ce"], f"held-out KL(teacher ‖ student): {kl}"
    assert agree["kd"] > agree["ce"], f"held-out top-1 agreement with the teacher: {agree}"


def test_teacher_beats_both_students(runs):
    ppl = _ppl(runs)
    assert ppl["teacher"] < ppl["kd"] < ppl["ce"], f"held-out perplexity: {ppl}"
    assert ppl["ce"] < 100, f"the CE student did not learn the language at all (unigram ≈ 260): {ppl}"

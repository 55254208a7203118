"""The quickstart's plan: which commands it runs with which configs, its folder binding and its report maths.

The stages themselves are the pipeline's own commands, tested where they live; the end-to-end smoke run
is tests/e2e/test_quickstart.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

from pathlib import Path

import pytest

from pipeline.config import CacheConfig, ConfigError, TrainConfig, load_config
from pipeline.quickstart import _bind_folder
from pipeline.quickstart.plan import PRUNED, SAMPLED, TEACHER, TEACHER_SAMPLED, build_plan, resolve_inputs, student_runs
from pipeline.quickstart.report import Result, markdown_table, read_result, with_ratios
from pipeline.quickstart.settings import SMOKE, QuickstartConfig


def _config(*overrides: str) -> QuickstartConfig:
    return load_config(QuickstartConfig, None, list(overrides))


def _read_config(cls, stage):
    (path, text), = stage.configs.items()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return load_config(cls, path)


def test_plan_runs_every_stage_in_order(tmp_path):
    stages = build_plan(_config(), tmp_path)
    assert [s.name for s in stages] == [
        "tokenizer", "shards_train", "shards_heldout", "teacher", "teacher_export", "cache_train_topk",
        "cache_heldout_topk", "cache_train_sampled", "shards_prompts", "cache_train_teacher_sampled", "prune", "ce",
        "kl", "rkl", "js", "tvd", SAMPLED, PRUNED, TEACHER_SAMPLED, "student_export"]
    assert all(s.command()[1:3] == ["-m", "pipeline"] for s in stages)


def test_students_differ_only_in_their_loss(tmp_path):
    """Same seed, model, data, schedule and eval for every student: the comparison is of the loss alone."""
    stages = build_plan(_config(), tmp_path)
    configs = {s.name: _read_config(TrainConfig, s) for s in stages if s.command()[3] == "train"}
    teacher = configs.pop(TEACHER)
    assert teacher.model.hidden_size > configs["ce"].model.hidden_size
    assert teacher.data.teacher_cache == "" and teacher.loss.divergence == "ce"
    pruned = configs.pop(PRUNED)
    assert pruned.model.init.endswith("student_pruned_hf") and pruned.loss == configs["kl"].loss
    prune = next(s for s in stages if s.name == "prune").command()
    assert prune[prune.index("--num-heads") + 1] == "2"  # 128 wide with the teacher's 64-wide heads
    for name, cfg in configs.items():
        assert cfg.model.init == ""
        for part in ("model", "schedule", "optim", "eval", "compute"):
            assert getattr(cfg, part) == getattr(configs["ce"], part), (name, part)
        assert cfg.seed == configs["ce"].seed
        assert cfg.data.tokens == configs["ce"].data.tokens or name == TEACHER_SAMPLED
        assert cfg.data.eval_teacher_cache.endswith("heldout_topk")
        assert cfg.eval.teacher.endswith("teacher_hf") and cfg.eval.risk_prompts > 0  # every student's risks
    assert configs["ce"].data.teacher_cache == ""
    assert {name: cfg.loss.divergence for name, cfg in configs.items()} == {
        "ce": "ce", "kl": "kl", "rkl": "rkl", "js": "js", "tvd": "tvd", SAMPLED: "kl", TEACHER_SAMPLED: "kl"}
    assert configs[SAMPLED].data.teacher_cache.endswith("train_sampled")
    assert configs["js"].loss.ce_weight == 0.5 and configs[SAMPLED].loss.ce_weight == 0.0
    assert configs["js"].data.teacher_cache.endswith("train_topk")
    sampled_prefixes = _read_config(CacheConfig, next(s for s in stages if s.name == "cache_train_teacher_sampled"))
    assert sampled_prefixes.prefixes.source == "teacher" and sampled_prefixes.tokens.endswith("data/prompts")
    assert configs[TEACHER_SAMPLED].data.tokens == str(Path(sampled_prefixes.output) / "generated")
    assert configs[TEACHER_SAMPLED].data.teacher_cache == sampled_prefixes.output


def test_kl_warmup_goes_to_the_bounded_and_reverse_students_only(tmp_path):
    stages = build_plan(_config("kl_warmup_steps=7", "student_run.steps=5"), tmp_path)
    configs = {s.name: _read_config(TrainConfig, s) for s in stages if s.command()[3] == "train"}
    warm = {name: cfg.loss.kl_warmup_steps for name, cfg in configs.items()}
    assert warm == {TEACHER: 0, "ce": 0, "kl": 0, "rkl": 5, "js": 5, "tvd": 5, SAMPLED: 0, PRUNED: 0,
                    TEACHER_SAMPLED: 0}  # clipped to the run
    labels = {run.name: run.label for run in student_runs(_config("kl_warmup_steps=3"))}
    assert labels["js"].endswith("after 3 steps of KL") and "KL" not in labels["kl"].split("to")[1]
    assert all(run.kl_warmup_steps == 0 for run in student_runs(_config("kl_warmup_steps=0")))


def test_fdistill_recipe_trains_each_divergence_along_its_own_prefixes_with_the_teacher_online(tmp_path):
    stages = build_plan(_config("recipe=fdistill", "fdistill.predistill_steps=9", "fdistill.prompt_len=12"), tmp_path)
    assert [s.name for s in stages] == ["tokenizer", "shards_train", "shards_heldout", "teacher", "teacher_export",
                                        "cache_heldout_topk", "ce", "fd_kl", "fd_rkl", "fd_js", "fd_tvd",
                                        "student_export"]
    configs = {s.name: _read_config(TrainConfig, s) for s in stages if s.command()[3] == "train"}
    ce = configs["ce"]
    assert ce.teacher.online == "" and ce.loss.divergence == "ce" and ce.data.teacher_cache == ""
    sources = {}
    for name in ("fd_kl", "fd_rkl", "fd_js", "fd_tvd"):
        cfg = configs[name]
        assert cfg.teacher.online.endswith("teacher_hf") and cfg.data.teacher_cache == ""
        assert cfg.loss.divergence == name[3:] and cfg.loss.prefixes.prompt_len == 12
        assert [(p.steps, p.divergence, p.prefixes.generates) for p in cfg.loss.phases] == [(9, "kl", False)]
        for part in ("model", "schedule", "optim", "eval", "compute", "seed"):
            assert getattr(cfg, part) == getattr(ce, part), (name, part)
        sources[name] = cfg.loss.prefixes.fractions()
    assert sources == {"fd_kl": {"data": 0.0, "teacher": 1.0, "student": 0.0},
                       "fd_rkl": {"data": 0.0, "teacher": 0.0, "student": 1.0},
                       "fd_js": {"data": 0.0, "teacher": 0.5, "student": 0.5},
                       "fd_tvd": {"data": 0.0, "teacher": 0.5, "student": 0.5}}
    assert configs["fd_js"].loss.beta == 0.15 and configs["fd_tvd"].loss.beta == ce.loss.beta
    assert [p.steps for p in _read_config(TrainConfig, next(
        s for s in build_plan(_config("recipe=fdistill", "fdistill.predistill_steps=0"), tmp_path / "b")
        if s.name == "fd_rkl")).loss.phases] == []


def test_cache_configs_follow_the_quickstart_config(tmp_path):
    stages = build_plan(_config("cache.k=8", "cache.draws=20"), tmp_path)
    caches = {s.name: _read_config(CacheConfig, s) for s in stages if s.command()[3] == "cache"}
    assert caches["cache_train_topk"].targets.mode == "topk" and caches["cache_train_topk"].targets.k == 8
    assert caches["cache_train_sampled"].targets.mode == "sampled"
    assert caches["cache_train_sampled"].targets.draws == 20
    assert caches["cache_heldout_topk"].tokens.endswith("heldout")


def test_choice_of_students(tmp_path):
    off = ("divergences=[js]", "sampled=false", "teacher_sampled.prompts=[]", "risks.prompts=0", "pruned=false")
    names = [run.name for run in student_runs(_config(*off))]
    assert names == ["ce", "js"]
    stages = build_plan(_config(*off), tmp_path)
    assert not {"cache_train_sampled", "shards_prompts", "cache_train_teacher_sampled", "prune"} & {s.name for s in stages}
    js = _read_config(TrainConfig, next(s for s in stages if s.name == "js"))
    assert js.eval.teacher == ""  # no risks
    with pytest.raises(ConfigError, match="divergences"):
        _config("divergences=[ce]")  # the baseline is always there; ce is not a divergence to a teacher


def test_smoke_overrides_resolve():
    cfg = _config(*SMOKE)
    assert cfg.student_run.steps < 100 and cfg.corpus.vocab_size < 1000


def test_missing_corpus_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="corpus.train.*no-such-book"):
        resolve_inputs(["data/austen/no-such-book.jsonl.gz"], "corpus.train")
    assert len(resolve_inputs(["data/austen/*.jsonl.gz"], "corpus.train")) == 6  # found in the checkout


def test_folder_made_with_another_config_is_refused(tmp_path):
    _bind_folder(_config(), tmp_path)
    _bind_folder(_config(), tmp_path)  # the same config: fine
    with pytest.raises(ConfigError, match=r"student_run\.steps: 200 → 300"):
        _bind_folder(_config("student_run.steps=300"), tmp_path)
    assert load_config(QuickstartConfig, tmp_path / "quickstart.yaml") == _config()  # untouched


def _write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_results_read_back_from_metrics(tmp_path):
    train = [{"step": s, "kind": "train", "perf/tokens_per_s": v} for s, v in ((1, 10.0), (2, 100.0), (3, 300.0))]
    _write_metrics(tmp_path / "ce", train + [{"step": 3, "kind": "eval", "eval/perplexity": 50.0,
                                               "eval/divergence": 0.5, "eval/top1_agreement": 0.4}])
    _write_metrics(tmp_path / "kl", train + [{"step": 3, "kind": "eval", "eval/perplexity": 40.0,
                                               "eval/divergence": 0.2, "eval/top1_agreement": 0.6,
                                               "eval/r_llh": 4.25, "eval/r_cvg": 3.5}])
    results = with_ratios([read_result(tmp_path / n, n, n.upper(), 9.0) for n in ("ce", "kl")], "ce")
    assert results[1].vs_ce == pytest.approx(0.8)
    assert results[0].tokens_per_s == 200.0  # median without the first step
    table = markdown_table(results)
    assert "| kl | KL | 40.00 | 0.800 | 0.2000 | 0.600 | 4.250 | 3.500 | 200 | 9 |" in table
    assert "| ce | CE | 50.00 | 1.000 | 0.5000 | 0.400 |  |  | 200 | 9 |" in table  # a run without risks
    _write_metrics(tmp_path / "broken", train)
    with pytest.raises(ValueError, match="broken/metrics.jsonl: no eval"):
        read_result(tmp_path / "broken", "broken", "", 0.0)
    assert isinstance(results[0], Result)


def test_help_and_reference():
    run = [sys.executable, "-m", "pipeline"]
    helped = subprocess.run(run + ["quickstart", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--smoke" in helped and "results.md" in helped
    reference = subprocess.run(run + ["config", "--kind", "quickstart", "--reference"], capture_output=True,
                               text=True, check=True).stdout
    assert "`student_run`" in reference and "`divergences`" in reference

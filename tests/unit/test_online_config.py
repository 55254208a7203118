"""Prefix sources and the loss schedule without training: which rows each source gets, which phase a step
is in, and what a config that cannot work is told (each error names its key)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from pipeline.config import ConfigError, TrainConfig, load_config
from pipeline.online.prefixes import SOURCES, assign_sources, phase_offset
from pipeline.train.errors import TrainError
from pipeline.train.setup import check_settings
from tests.shardmaker import make_token_shards
from tests.trainkit import student_overrides

MIXES = [{"data": 0.2, "teacher": 0.3, "student": 0.5}, {"data": 0.0, "teacher": 0.5, "student": 0.5},
         {"data": 1 / 3, "teacher": 1 / 3, "student": 1 / 3}, {"data": 0.1, "teacher": 0.0, "student": 0.9},
         {"data": 0.0, "teacher": 0.0, "student": 1.0}, {"data": 0.1, "teacher": 0.2, "student": 0.7}]
OFFSETS = [phase_offset(0, step, f"shard-000000-{i:06d}") for step in range(4) for i in range(25)] + [
    0.0, 0.5, 1 - 2**-53, 0.25 - 1e-12]


@pytest.mark.parametrize("fractions", MIXES, ids=lambda f: "-".join(f"{v:.2f}" for v in f.values()))
def test_every_micro_batch_holds_each_share_up_to_one_row(fractions):
    for rows in range(1, 13):
        for offset in OFFSETS:
            counts = Counter(assign_sources(rows, fractions, offset))
            assert sum(counts.values()) == rows
            for name in SOURCES:
                assert abs(counts[name] - fractions[name] * rows) < 1, (rows, offset, counts)
                if fractions[name] == 0:
                    assert counts[name] == 0, f"{name} has fraction 0 but got rows ({rows}, {offset})"


def test_two_rows_at_halves_are_one_of_each_whatever_the_offset():
    for offset in OFFSETS:
        assert sorted(assign_sources(2, {"data": 0.0, "teacher": 0.5, "student": 0.5}, offset)) == [
            "student", "teacher"]
        assert sorted(assign_sources(2, {"data": 0.5, "teacher": 0.0, "student": 0.5}, offset)) == [
            "data", "student"]


def test_one_row_micro_batches_get_the_exact_shares_over_the_offset():
    fractions, grid = {"data": 0.25, "teacher": 0.25, "student": 0.5}, 4000
    counts = Counter(assign_sources(1, fractions, k / grid)[0] for k in range(grid))
    assert {name: counts[name] / grid for name in SOURCES} == pytest.approx(fractions, abs=1 / grid)


def test_offsets_are_uniform_and_depend_on_seed_step_and_key_only():
    offsets = [phase_offset(7, 3, f"k{i}") for i in range(2000)]
    assert all(0 <= u < 1 for u in offsets)
    assert sum(offsets) / len(offsets) == pytest.approx(0.5, abs=0.03)
    assert sum(u < 0.25 for u in offsets) / len(offsets) == pytest.approx(0.25, abs=0.03)
    base = phase_offset(7, 3, "k0")
    assert len({base, phase_offset(8, 3, "k0"), phase_offset(7, 4, "k0"), phase_offset(7, 3, "k1")}) == 4


def _cfg(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, list(overrides))


def test_phase_at_walks_the_schedule_then_the_main_loss():
    cfg = _cfg("loss.divergence=rkl", "loss.prefixes.student=1",
               "loss.phases=[{steps: 2, divergence: kl}, {steps: 3, prefixes: {teacher: 1}}]")
    loss = cfg.loss
    got = [(d, p.data_fraction, p.teacher, p.student) for d, p in (loss.phase_at(s) for s in range(7))]
    assert got == [("kl", 1, 0, 0)] * 2 + [("rkl", 0, 1, 0)] * 3 + [("rkl", 0, 0, 1)] * 2
    assert _cfg("loss.divergence=js").loss.phase_at(0)[0] == "js"


@pytest.mark.parametrize("overrides, message", [
    (["loss.prefixes.teacher=0.5", "loss.prefixes.data=0.2"],
     "loss.prefixes.data: the fractions data + teacher + student must sum to 1, got 0.2 + 0.5 + 0.0 = 0.7"),
    (["loss.prefixes.teacher=0.7", "loss.prefixes.student=0.6"],
     "loss.prefixes.teacher: teacher + student = 1.3 exceeds 1"),
    (["loss.phases=[{steps: 2, prefixes: {teacher: 0.3, data: 0.3}}]"],
     "loss.phases[0].prefixes.data: the fractions data + teacher + student must sum to 1"),
    (["loss.prefixes.student=1.5"], "loss.prefixes.student:"),
    (["loss.kl_warmup_steps=3", "loss.phases=[{steps: 2}]"], "loss.kl_warmup_steps: and phases both"),
])
def test_fractions_and_schedule_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        _cfg(*overrides)
    assert message in str(caught.value)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("online_config") / "tokens"
    make_token_shards(folder, [4], seq_len=8, vocab_size=300, seed=0)
    return folder


@pytest.mark.parametrize("extra, keys", [
    (dict(loss__prefixes__student=1.0), ["loss.prefixes:", "set teacher.online"]),
    (dict(loss__prefixes__teacher=0.5, loss__divergence="ce"), ["loss.prefixes:", "set teacher.online"]),
    (dict(loss__phases="[{steps: 1, prefixes: {student: 1}}]", loss__divergence="ce"),
     ["loss.phases[0].prefixes:", "teacher.online"]),
    (dict(teacher__online="/x/teacher", data__teacher_cache="/x/cache"),
     ["teacher.online=/x/teacher", "data.teacher_cache=/x/cache", "both set"]),
    (dict(teacher__hidden_weight=0.5, loss__divergence="ce"), ["teacher.hidden_weight needs teacher.online"]),
    (dict(loss__divergence="rkl"), ["loss.divergence='rkl' needs a teacher", "teacher.online"]),
    (dict(loss__phases="[{steps: 1, divergence: kl}]", loss__divergence="ce"), ["loss.divergence='kl' needs"]),
    (dict(teacher__online="/x/teacher", loss__prefixes__student=1.0, loss__prefixes__prompt_len=9),
     ["loss.prefixes.prompt_len=9 leaves no token to generate", "1 ≤ prompt_len ≤ 8"]),
])
def test_teacher_and_prefix_errors_name_the_keys(tmp_path, tokens, extra, keys):
    overrides = student_overrides(tmp_path / "run", tokens, **extra)
    with pytest.raises(TrainError) as caught:
        check_settings(load_config(TrainConfig, None, overrides))
    for key in keys:
        assert key in str(caught.value), str(caught.value)


def test_online_teacher_with_generated_prefixes_passes_the_checks(tmp_path, tokens):
    overrides = student_overrides(tmp_path / "run", tokens, teacher__online="/x/teacher", loss__divergence="tvd",
                                  loss__prefixes__teacher=0.5, loss__prefixes__student=0.5,
                                  loss__prefixes__prompt_len=8)
    check_settings(load_config(TrainConfig, None, overrides))


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FDISTILL = {"kl": ("kl", 0.0, 1.0, 0.0), "rkl": ("rkl", 0.0, 0.0, 1.0), "js": ("js", 0.0, 0.5, 0.5),
            "tvd": ("tvd", 0.0, 0.5, 0.5)}  # divergence, data, teacher, student (f-DISTILL, Table 1)


def test_fdistill_configs_differ_in_their_loss_line_only_and_schedule_the_variants(tmp_path, tokens):
    texts = {name: (CONFIGS / f"fdistill_{name}.yaml").read_text().splitlines() for name in FDISTILL}
    for name, lines in texts.items():
        differing = [a for a, b in zip(lines, texts["kl"]) if a != b]
        assert len(lines) == len(texts["kl"]) and len(differing) == (name != "kl"), (name, differing)
        assert all(line.startswith("loss:") for line in differing)
        cfg = load_config(TrainConfig, CONFIGS / f"fdistill_{name}.yaml")
        pre, prefixes = cfg.loss.phase_at(199)
        assert pre == "kl" and prefixes.data_fraction == 1 and not prefixes.generates  # word-level first
        divergence, prefixes = cfg.loss.phase_at(200)
        assert (divergence, prefixes.data_fraction, prefixes.teacher, prefixes.student) == FDISTILL[name]
        assert (prefixes.sampling.top_k, prefixes.sampling.temperature) == (30, 1.0)
        # the released code's JS: 0.85 on the student's term KL(q‖M), M = 0.15·p + 0.85·q
        assert name != "js" or (cfg.loss.divergence_params()["beta"] == pytest.approx(0.15))
        run = load_config(TrainConfig, CONFIGS / f"fdistill_{name}.yaml", [
            f"run_dir={tmp_path / name}", f"data.tokens={tokens}", "teacher.online=/x/teacher",
            "model.vocab_size=300", "loss.prefixes.prompt_len=8"])
        check_settings(run)  # what `distill train` checks first: a config the trainer accepts


def test_online_teacher_with_another_tokenizer_is_refused(tmp_path):
    from tokenization.tokenizer import fingerprint, load_tokenizer, train_tokenizer

    (tmp_path / "corpus.txt").write_text("the teacher reads the ids it was trained on, and so does the student\n" * 20)
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    train_tokenizer([tmp_path / "corpus.txt"], 280, out_path=teacher / "tokenizer.json")
    own = fingerprint(load_tokenizer(teacher))
    for name, shard_fingerprint in (("other", "e" * 64), ("same", own)):
        make_token_shards(tmp_path / name, [4], seq_len=8, vocab_size=280, fingerprint=shard_fingerprint)
        cfg = load_config(TrainConfig, None, student_overrides(tmp_path / f"run_{name}", tmp_path / name,
                                                               teacher__online=teacher, loss__divergence="kl"))
        if name == "same":
            check_settings(cfg)
            continue
        with pytest.raises(TrainError) as caught:
            check_settings(cfg)
        assert str(caught.value).startswith(f"teacher.online: teacher {teacher}: its tokenizer (fingerprint "
                                            f"{own[:12]}…) is not the one the token shards in {tmp_path / name}")

"""The typed config tree: loading, overrides, error messages, round trips and the reference."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

import pytest

from pipeline.config import (ConfigError, DivergenceName, LossConfig, ParallelConfig, RunConfig, TrainConfig,
                             config_reference, config_to_dict, dump_yaml, from_dict, in_range, load_config, positive,
                             section, setting)


@dataclass(frozen=True)
class Inner:
    """The innermost section of the test tree."""

    depth: int = setting(3, "How deep.", positive)
    names: tuple[str, ...] = setting(("a", "b"), "Some names.")
    sizes: list[int] = setting([1, 2], "Some sizes, each positive.", positive)


@dataclass(frozen=True)
class Middle:
    """A section holding a section."""

    inner: Inner = section(Inner, "The inner section.")
    ratio: Optional[float] = setting(None, "A ratio, or null.", in_range(0, 1))


@dataclass(frozen=True)
class Tree:
    """A test root exercising every supported kind of field."""

    count: int = field(metadata={"doc": "A required count."})
    label: str = setting("x", "A free string.")
    flag: bool = setting(False, "A flag.")
    mode: Literal["a", "b"] = setting("a", "A choice.")
    middle: Middle = section(Middle, "The middle section.")
    spare: Optional[Middle] = setting(None, "An optional section.")


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(*args, **kwargs)
    return str(caught.value)


# --- values -----------------------------------------------------------------------------------


def test_no_file_and_no_overrides_give_the_defaults():
    assert load_config(RunConfig) == RunConfig()


def test_every_default_passes_its_own_checks():
    assert from_dict(RunConfig, config_to_dict(RunConfig())) == RunConfig()


def test_overrides_change_values_with_yaml_scalar_types():
    cfg = load_config(RunConfig, overrides=["loss.temperature=2.0", "parallel.tp=2", "loss.divergence=js",
                                            "loss.chunk_size=4096"])
    assert (cfg.loss.temperature, cfg.parallel.tp, cfg.loss.divergence) == (2.0, 2, "js")
    assert cfg.loss.chunk_size == 4096


def test_an_int_is_accepted_as_a_float_and_stored_as_float():
    cfg = load_config(RunConfig, overrides=["loss.temperature=2"])
    assert cfg.loss.temperature == 2.0 and type(cfg.loss.temperature) is float


def test_exponent_without_a_dot_reads_as_a_float():
    assert load_config(RunConfig, overrides=["loss.temperature=5e-1"]).loss.temperature == 0.5


def test_null_sets_an_optional_back_to_none(tmp_path):
    path = write(tmp_path, "loss:\n  chunk_size: 128\n")
    assert load_config(RunConfig, path).loss.chunk_size == 128
    assert load_config(RunConfig, path, ["loss.chunk_size=null"]).loss.chunk_size is None


def test_overrides_win_over_the_file_and_later_overrides_win(tmp_path):
    path = write(tmp_path, "loss:\n  temperature: 3.0\n  divergence: rkl\n")
    cfg = load_config(RunConfig, path, ["loss.temperature=1.5", "loss.temperature=2.5"])
    assert (cfg.loss.temperature, cfg.loss.divergence) == (2.5, "rkl")


def test_an_override_can_repair_a_bad_file_value(tmp_path):
    path = write(tmp_path, "loss:\n  temperature: -1.0\n")
    assert load_config(RunConfig, path, ["loss.temperature=1.0"]).loss.temperature == 1.0


def test_nested_sections_lists_and_optional_sections():
    cfg = load_config(Tree, overrides=["count=1", "middle.inner.depth=9", "middle.inner.names=[p, q, r]",
                                       "middle.inner.sizes=[4]", "middle.ratio=0.25", "spare.ratio=1"])
    assert cfg.middle.inner == Inner(depth=9, names=("p", "q", "r"), sizes=[4])
    assert cfg.middle.ratio == 0.25
    assert cfg.spare == Middle(ratio=1.0)


def test_empty_file_and_empty_section_take_the_defaults(tmp_path):
    assert load_config(RunConfig, write(tmp_path, "")) == RunConfig()
    assert load_config(RunConfig, write(tmp_path, "loss:\n  # all commented out\n")) == RunConfig()


def test_list_defaults_are_not_shared_between_instances():
    assert Inner().sizes is not Inner().sizes


# --- errors -----------------------------------------------------------------------------------


def test_misspelt_key_names_it_lists_valid_keys_and_suggests(tmp_path):
    path = write(tmp_path, "loss:\n  temprature: 2.0\n")
    assert error_of(RunConfig, path) == (
        f"{path}: loss.temprature: unknown key (got 2.0 (float)); valid keys of loss: divergence, temperature, "
        "ce_weight, beta, alpha, chunk_size, fused_output, kl_warmup_steps, target_mode, prefixes, phases; "
        "did you mean 'temperature'?")


def test_misspelt_override_key_is_reported_for_the_command_line():
    message = error_of(RunConfig, overrides=["loss.temprature=2.0"])
    assert message.startswith("command line: loss.temprature: unknown key (got 2.0 (float));")
    assert "did you mean 'temperature'?" in message


def test_wrong_type_names_key_value_and_expected_type():
    assert error_of(RunConfig, overrides=["parallel.tp=two"]) == \
        "command line: parallel.tp: expected int, got 'two' (str)"


@pytest.mark.parametrize("override, expected", [
    ("parallel.tp=true", "parallel.tp: expected int, got True (bool)"),
    ("loss.temperature=false", "loss.temperature: expected float, got False (bool)"),
    ("parallel.tp=2.0", "parallel.tp: expected int, got 2.0 (float)"),
    ("loss.temperature='2'", "loss.temperature: expected float, got '2' (str)"),
    ("loss.temperature=.inf", "loss.temperature: expected a finite float, got inf"),
    ("loss.chunk_size=[1]", "loss.chunk_size: expected int, got [1] (list)"),
])
def test_no_silent_conversions(override, expected):
    assert error_of(RunConfig, overrides=[override]) == "command line: " + expected


@pytest.mark.parametrize("override, expected", [
    ("loss.temperature=-1", "loss.temperature: expected > 0, got -1.0"),
    ("loss.ce_weight=1.5", "loss.ce_weight: expected in [0, 1], got 1.5"),
    ("loss.beta=0", "loss.beta: expected in (0, 1), got 0.0"),
    ("loss.beta=1", "loss.beta: expected in (0, 1), got 1.0"),
    ("loss.alpha=1", "loss.alpha: expected in [0, 1), got 1.0"),
    ("loss.chunk_size=0", "loss.chunk_size: expected > 0, got 0"),
    ("parallel.tp=0", "parallel.tp: expected >= 1, got 0"),
    ("parallel.timeout_minutes=0", "parallel.timeout_minutes: expected > 0, got 0.0"),
])
def test_out_of_range_values_name_the_range(override, expected):
    assert error_of(RunConfig, overrides=[override]) == "command line: " + expected


def test_top_level_settings_are_checked_and_are_not_sections():
    assert error_of(TrainConfig, overrides=["seed=-1"]) == "command line: seed: expected >= 0, got -1"
    assert error_of(TrainConfig, overrides=["seed.value=2"]) == \
        "command line: seed.value: 'seed' is a setting, not a section"


def test_ends_of_closed_ranges_are_accepted():
    cfg = load_config(RunConfig, overrides=["loss.ce_weight=0", "loss.ce_weight=1", "loss.alpha=0"])
    assert (cfg.loss.ce_weight, cfg.loss.alpha) == (1.0, 0.0)


def test_bad_choice_lists_the_choices_and_suggests():
    assert error_of(RunConfig, overrides=["loss.divergence=kll"]) == (
        "command line: loss.divergence: expected one of 'kl', 'rkl', 'js', 'tvd', 'skew_kl', 'skew_rkl', 'ce', "
        "got 'kll' (str); did you mean 'kl'?")


def test_range_errors_from_a_file_name_the_file(tmp_path):
    path = write(tmp_path, "loss:\n  temperature: -1.0\n")
    assert error_of(RunConfig, path) == f"{path}: loss.temperature: expected > 0, got -1.0"


def test_file_errors_name_the_file_even_with_overrides_elsewhere(tmp_path):
    path = write(tmp_path, "parallel:\n  tp: two\n")
    assert error_of(RunConfig, path, ["loss.temperature=2"]) == \
        f"{path}: parallel.tp: expected int, got 'two' (str)"


def test_a_section_that_is_not_a_mapping(tmp_path):
    path = write(tmp_path, "loss: 3\n")
    assert error_of(RunConfig, path) == f"{path}: loss: expected a mapping of LossConfig settings, got 3 (int)"
    assert error_of(RunConfig, path, ["loss.temperature=2"]).startswith(f"{path}: loss: expected a mapping")


def test_an_override_into_a_falsy_non_mapping_section_still_reports_the_file(tmp_path):
    path = write(tmp_path, "loss: 0\n")
    assert error_of(RunConfig, path, ["loss.temperature=2"]) == \
        f"{path}: loss: expected a mapping of LossConfig settings, got 0 (int)"


def test_an_override_does_not_leak_into_a_yaml_alias_of_the_same_section(tmp_path):
    @dataclass(frozen=True)
    class Twins:
        first: Inner = section(Inner, "One copy.")
        second: Inner = section(Inner, "Another copy.")

    path = write(tmp_path, "first: &shared {depth: 4}\nsecond: *shared\n")
    cfg = load_config(Twins, path, ["first.depth=5"])
    assert (cfg.first.depth, cfg.second.depth) == (5, 4)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "- loss\n- parallel\n")
    assert error_of(RunConfig, path) == \
        f"{path}: expected a mapping of section names at the top level, got ['loss', 'parallel'] (list)"


def test_unknown_top_level_key_in_a_file_suggests_the_section(tmp_path):
    path = write(tmp_path, "los:\n  temperature: 2.0\n")
    message = error_of(RunConfig, path)
    assert message.startswith(f"{path}: los: unknown key (got {{'temperature': 2.0}} (dict)); valid keys of the top "
                              "level: parallel, loss")
    assert message.endswith("did you mean 'loss'?")


@pytest.mark.parametrize("override, expected", [
    ("loss.temperature", "malformed override 'loss.temperature': expected section.key=value"),
    ("loss..temperature=2", "malformed override 'loss..temperature=2': expected section.key=value"),
    ("=2", "malformed override '=2': expected section.key=value"),
    ("los.temperature=2", "los: unknown section; valid keys of the top level: parallel, loss; "
                          "did you mean 'loss'?"),
    ("loss.temperature=[1", "loss.temperature: cannot parse '[1' as a YAML value: expected ',' or ']', "
                            "but got '<stream end>' (line 1, column 3)"),
])
def test_malformed_overrides(override, expected):
    assert error_of(RunConfig, overrides=[override]) == "command line: " + expected


def test_missing_file_is_a_clear_error(tmp_path):
    assert error_of(RunConfig, tmp_path / "absent.yaml") == f"{tmp_path / 'absent.yaml'}: config file not found"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "loss:\n  temperature: [1.0\n")
    message = error_of(RunConfig, path)
    assert message.startswith(f"{path}: invalid YAML: ") and "(line 3," in message


def test_duplicate_keys_are_an_error(tmp_path):
    path = write(tmp_path, "loss:\n  temperature: 1.0\n  temperature: 2.0\n")
    assert error_of(RunConfig, path) == f"{path}: invalid YAML: duplicate key 'temperature' (line 3, column 3)"


def test_missing_required_key_and_bad_list_items():
    assert error_of(Tree) == "count: required key is missing"
    assert error_of(Tree, overrides=["count=1", "middle.inner.sizes=[1, 0]"]) == \
        "command line: middle.inner.sizes[1]: expected > 0, got 0"
    assert error_of(Tree, overrides=["count=1", "middle.inner.names=abc"]) == \
        "command line: middle.inner.names: expected a list of str, got 'abc' (str)"


def test_config_error_is_a_value_error_with_its_parts():
    with pytest.raises(ValueError) as caught:
        load_config(RunConfig, overrides=["loss.temperature=0"])
    err = caught.value
    assert (err.source, err.key, err.problem) == ("command line", "loss.temperature", "expected > 0, got 0.0")


def test_sections_must_be_frozen_dataclasses():
    @dataclass
    class Loose:
        size: int = setting(1, "A size.")

    with pytest.raises(TypeError, match="frozen"):
        load_config(Loose)


# --- writing ----------------------------------------------------------------------------------


def test_dump_yaml_round_trips_a_changed_config(tmp_path):
    cfg = load_config(RunConfig, overrides=["loss.divergence=skew_rkl", "loss.alpha=0.25", "loss.chunk_size=64",
                                            "parallel.backend=gloo"])
    assert load_config(RunConfig, write(tmp_path, dump_yaml(cfg))) == cfg


def test_dump_yaml_round_trips_nested_lists_optionals_and_float_like_strings(tmp_path):
    cfg = load_config(Tree, overrides=["count=2", "label='1e3'", "flag=true", "mode=b", "middle.inner.names=[x]",
                                       "spare.inner.depth=5"])
    assert cfg.label == "1e3"
    assert load_config(Tree, write(tmp_path, dump_yaml(cfg))) == cfg


def test_config_to_dict_gives_plain_data():
    cfg = load_config(Tree, overrides=["count=2"])
    assert config_to_dict(cfg) == {
        "count": 2, "label": "x", "flag": False, "mode": "a",
        "middle": {"inner": {"depth": 3, "names": ["a", "b"], "sizes": [1, 2]}, "ratio": None}, "spare": None}


def test_reference_has_a_table_per_section_with_type_default_and_doc():
    text = config_reference(RunConfig)
    for heading in ("### Top level", "### `parallel`", "### `loss`"):
        assert heading in text
    assert "| `temperature` | float, > 0 | `1.0` | T, dividing teacher and student logits" in text
    assert "| `chunk_size` | int or null, > 0 | `null` |" in text
    assert "| `backend` | one of auto, gloo, nccl | `auto` |" in text
    assert text.index("### `parallel`") < text.index("| `tp` |") < text.index("### `loss`")


def test_reference_renders_every_kind_of_field():
    text = config_reference(Tree)
    assert "### `middle.inner`" in text and "### `spare`" in text
    assert "| `names` | list of str | `[a, b]` | Some names. |" in text
    assert "| `count` | int | `(required)` |" in text


def test_every_config_field_has_a_doc():
    for cls in (RunConfig, ParallelConfig, LossConfig):
        for spec in dataclasses.fields(cls):
            assert len(spec.metadata.get("doc", "")) > 20, f"{cls.__name__}.{spec.name}"


def test_a_field_without_doc_fails_the_reference():
    @dataclass(frozen=True)
    class Bare:
        size: int = 1

    with pytest.raises(TypeError, match="Bare.size"):
        config_reference(Bare)


# --- the loss section against the loss code ---------------------------------------------------


@pytest.mark.parametrize("divergence, params", [
    ("kl", {}), ("rkl", {}), ("tvd", {}), ("ce", {}), ("js", {"beta": 0.3}),
    ("skew_kl", {"alpha": 0.2}), ("skew_rkl", {"alpha": 0.2}),
])
def test_divergence_params(divergence, params):
    assert LossConfig(divergence=divergence, beta=0.3, alpha=0.2).divergence_params() == params


def test_loss_section_agrees_with_the_loss_code():
    from pipeline.losses import DIVERGENCES

    assert set(get_args(DivergenceName)) == set(DIVERGENCES)
    for name, divergence in DIVERGENCES.items():
        assert set(LossConfig(divergence=name).divergence_params()) == set(divergence.params)
        for param, spec in divergence.params.items():
            assert getattr(LossConfig(), param) == spec.default
            for value in (0.0, 0.5, 1.0):
                assert accepts(LossConfig, {param: value}) == spec.contains(value), (param, value)


def accepts(cls, data) -> bool:
    try:
        from_dict(cls, data)
    except ConfigError:
        return False
    return True

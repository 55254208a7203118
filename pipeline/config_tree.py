"""Generic machinery for config trees of frozen dataclasses: YAML in, overrides, checks, YAML out.

A config tree is a frozen dataclass whose fields are settings (bool, int, float, str, Literal[...],
Optional[...], list[X], tuple[X, ...], or a free-form dict passed through to another tool) or nested
sections (frozen dataclasses). Each field carries its documentation and constraint in
`field(metadata=...)`, declared with `setting` and `section`. The functions here (`load_config`,
`from_dict`, `config_to_dict`, `dump_yaml`, `config_reference`) walk any such tree by its type hints;
they know nothing about the pipeline's own sections (pipeline/config.py).

Design choice: validation is strict and happens once, at load time, against the type hints. A
misspelt key, a string where an int belongs or a value out of range stops the run with a message
naming the file (or the command line), the dotted key, the value and what was expected; nothing is
converted silently (bool is not an int, "2" is not a number; only int → float is allowed). The cost:
a config cannot carry keys the code does not declare, and a dataclass constructed directly in Python
skips the checks, so code that builds configs by hand should go through `from_dict`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

COMMAND_LINE = "command line"
"""The source named in errors about overrides, where a file's errors name the file."""


class ConfigError(ValueError):
    """A config that cannot be used; the message is `[source: ][dotted.key: ]what was expected`."""

    def __init__(self, key: str, problem: str, source: str | None = None):
        self.key, self.problem, self.source = key, problem, source
        super().__init__(": ".join(part for part in (source, key, problem) if part))

    def with_source(self, source: str | None) -> ConfigError:
        return ConfigError(self.key, self.problem, source)


# --- declaring settings -----------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A constraint on a setting's value: a predicate and the words for what it expects."""

    expected: str
    predicate: Callable[[Any], bool]

    def __call__(self, value: Any) -> bool:
        return self.predicate(value)


def at_least(low: float) -> Check:
    return Check(f">= {low:g}", lambda value: value >= low)


def greater_than(low: float) -> Check:
    return Check(f"> {low:g}", lambda value: value > low)


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Check:
    """low <= value <= high, an end excluded when its `_open` flag is set; printed as `in [a, b)`."""
    text = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def inside(value: float) -> bool:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    return Check(text, inside)


positive = greater_than(0)
non_negative = at_least(0)


def setting(default: Any, doc: str, check: Check | None = None) -> Any:
    """A field holding one setting with its documentation and an optional constraint.

    The constraint applies to the value when it is not None, and to each item of a list or tuple.
    A list default is copied for each instance.
    """
    metadata = {"doc": doc} if check is None else {"doc": doc, "check": check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, doc: str) -> Any:
    """A field holding a nested section, built from its defaults when the YAML omits it."""
    return field(default_factory=cls, metadata={"doc": doc})


# --- reading YAML -----------------------------------------------------------------------------

_FLOAT_WITH_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads 3e-4 as a float (as YAML 1.2 does) and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key_node.value!r}",
                                                        key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """Safe YAML output that quotes the strings `_Loader` would read as floats."""


for _reader_or_writer in (_Loader, _Dumper):
    _reader_or_writer.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_WITH_EXPONENT, list("-+.0123456789"))


def _read_yaml(path: Path) -> dict:
    """The top-level mapping of a YAML file; an empty file is an empty mapping."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except FileNotFoundError:
        raise ConfigError("", "config file not found", str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("", f"cannot read config file: {err}", str(path)) from None
    except yaml.YAMLError as err:
        raise ConfigError("", f"invalid YAML: {_describe_yaml_error(err)}", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"expected a mapping of section names at the top level, got {_show(data)}", str(path))
    return data


def _describe_yaml_error(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    return problem if mark is None else f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


def _show(value: Any) -> str:
    """A value and its type for error messages, shortened: 'two' (str)."""
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


# --- building the tree from plain data --------------------------------------------------------


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a frozen dataclass's init fields, in declaration order."""
    if not (isinstance(cls, type) and is_dataclass(cls) and cls.__dataclass_params__.frozen):
        raise TypeError(f"{cls!r}: config sections must be frozen dataclasses")
    hints = get_type_hints(cls)
    return {spec.name: hints[spec.name] for spec in fields(cls) if spec.init}


def _optional_inner(hint: Any) -> Any | None:
    """X for Optional[X] (or X | None); None for any other hint."""
    if get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint):
        rest = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported config type {hint!r}: the only unions supported are Optional[X]")
        return rest[0]
    return None


def _section_type(hint: Any) -> type | None:
    """The dataclass a field holds (also through Optional), or None for a setting."""
    hint = _optional_inner(hint) or hint
    return hint if isinstance(hint, type) and is_dataclass(hint) else None


def _unknown_key(cls: type, key: str, what: str) -> ConfigError:
    """An error for a key `cls` lacks that lists the valid keys and suggests the closest."""
    parent, _, name = key.rpartition(".")
    valid = list(_field_hints(cls))
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(key, f"{what}; valid keys of {parent or 'the top level'}: {', '.join(valid)}{hint}")


def from_dict(cls: type, data: Any, *, key: str = "") -> Any:
    """The dataclass `cls` built from a mapping, every key, type and range checked.

    A missing key takes the field's default; a None section (a YAML section whose keys are all
    commented out) is an empty one. `key` is where `data` sits in the tree, for error messages.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(key, f"expected a mapping of {cls.__name__} settings, got {_show(data)}")
    hints = _field_hints(cls)
    for name, value in data.items():
        if name not in hints:
            raise _unknown_key(cls, _join(key, name), f"unknown key (got {_show(value)})")
    values = {}
    for spec in fields(cls):
        dotted = _join(key, spec.name)
        if spec.name in data:
            values[spec.name] = _coerce(data[spec.name], hints[spec.name], dotted, spec.metadata.get("check"))
        elif spec.init and spec.default is MISSING and spec.default_factory is MISSING:
            raise ConfigError(dotted, "required key is missing")
    try:
        return cls(**values)
    except ConfigError as err:  # a cross-field check in __post_init__ names its key within the section
        raise ConfigError(_join(key, err.key), err.problem, err.source) from None


def _coerce(value: Any, hint: Any, key: str, check: Check | None) -> Any:
    """`value` as the type `hint` describes and `check` allows, or a ConfigError naming `key`."""
    inner = _optional_inner(hint)
    if inner is not None:
        return None if value is None else _coerce(value, inner, key, check)
    if _section_type(hint) is not None:
        return from_dict(hint, value, key=key)
    origin = get_origin(hint)
    if origin in (tuple, list):
        return _coerce_sequence(value, hint, key, check)
    if hint is dict or origin is dict:
        return _coerce_mapping(value, key)
    result = _choose(value, get_args(hint), key) if origin is Literal else _coerce_scalar(value, hint, key)
    if check is not None and not check(result):
        raise ConfigError(key, f"expected {check.expected}, got {result!r}")
    return result


def _coerce_sequence(value: Any, hint: Any, key: str, check: Check | None) -> tuple | list:
    """A YAML list as list[X] or tuple[X, ...], each item coerced and checked."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        raise TypeError(f"{key}: unsupported config type {hint!r}; use tuple[X, ...]")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"expected a list of {_type_name(args[0])}, got {_show(value)}")
    return origin(_coerce(item, args[0], f"{key}[{index}]", check) for index, item in enumerate(value))


def _coerce_mapping(value: Any, key: str) -> dict:
    """A free-form mapping (keys passed through to another tool's config): any YAML mapping, copied."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping, got {_show(value)}")
    return copy.deepcopy(dict(value))


def _choose(value: Any, choices: tuple, key: str) -> Any:
    """`value` when it is one of the Literal's choices, type included (True is not 1)."""
    if any(value == choice and type(value) is type(choice) for choice in choices):
        return value
    names = [choice for choice in choices if isinstance(choice, str)]
    close = difflib.get_close_matches(value, names, n=1) if isinstance(value, str) else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(key, f"expected one of {', '.join(map(repr, choices))}, got {_show(value)}{hint}")


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    """A bool, int, float or str taken as it is; an int is also accepted as a float, nothing else converts."""
    if hint not in (bool, int, float, str):
        raise TypeError(f"{key}: unsupported config type {hint!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, hint) or (isinstance(value, bool) and hint is not bool):
        raise ConfigError(key, f"expected {hint.__name__}, got {_show(value)}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(key, f"expected a finite float, got {value!r}")
    return value


# --- overrides and loading --------------------------------------------------------------------


def _parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` as (["a", "b"], the value parsed as YAML: a scalar, or a flow list or mapping)."""
    name, sep, raw = text.partition("=")
    path = name.strip().split(".")
    if not sep or not all(path):
        raise ConfigError("", f"malformed override {text!r}: expected section.key=value", COMMAND_LINE)
    try:
        return path, yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as err:
        problem = f"cannot parse {raw!r} as a YAML value: {_describe_yaml_error(err)}"
        raise ConfigError(".".join(path), problem, COMMAND_LINE) from None


def _apply_override(cls: type, raw: dict, path: list[str], value: Any) -> None:
    """raw[path[0]]...[path[-1]] = value, each step checked against the class tree."""
    node, section_cls = raw, cls
    for depth, name in enumerate(path):
        key, last = ".".join(path[: depth + 1]), depth == len(path) - 1
        hint = _field_hints(section_cls).get(name)
        if hint is None:
            what = f"unknown key (got {_show(value)})" if last else "unknown section"
            raise _unknown_key(section_cls, key, what).with_source(COMMAND_LINE)
        if last:
            node[name] = value
            return
        if hint is dict or get_origin(hint) is dict:  # a free-form mapping: the rest of the path is inside it
            _set_nested(node, path[depth:], value, key)
            return
        section_cls = _section_type(hint)
        if section_cls is None:
            raise ConfigError(".".join(path), f"{key!r} is a setting, not a section", COMMAND_LINE)
        child = {} if node.get(name) is None else node[name]
        if not isinstance(child, dict):
            raise ConfigError(key, f"expected a mapping of {section_cls.__name__} settings, got {_show(child)}")
        node[name] = dict(child)  # a copy, so a section YAML aliases elsewhere keeps its own values
        node = node[name]


def _set_nested(node: dict, path: list[str], value: Any, key: str) -> None:
    """node[path[0]]...[path[-1]] = value inside a free-form mapping, creating the mappings on the way."""
    for name in path[:-1]:
        child = node.get(name)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(key, f"expected a mapping at {name!r}, got {_show(child)}", COMMAND_LINE)
        node[name] = dict(child)
        node = node[name]
    node[path[-1]] = value


def _source_of(key: str, overridden: Sequence[str], path: Path | None) -> str | None:
    """Where the value at `key` came from: the command line when an override set it, else the file."""
    if any(key == name or key.startswith((name + ".", name + "[")) for name in overridden):
        return COMMAND_LINE
    return None if path is None else str(path)


def load_config(cls: type, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    """The config tree `cls` from a YAML file (optional) with `section.key=value` overrides applied.

    Raises ConfigError naming the file or the command line, the dotted key, the value and what was expected.
    """
    path = None if path is None else Path(path)
    raw = {} if path is None else _read_yaml(path)
    overridden: list[str] = []
    try:
        for text in overrides:
            keys, value = _parse_override(text)
            overridden.append(".".join(keys))
            _apply_override(cls, raw, keys, value)
        return from_dict(cls, raw)
    except ConfigError as err:
        if err.source is not None:
            raise
        raise err.with_source(_source_of(err.key, overridden, path)) from None


# --- writing ----------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain dicts, lists and scalars, which `from_dict` reads back."""
    return {spec.name: _plain(getattr(cfg, spec.name)) for spec in fields(cfg)}


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return config_to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def config_reference(cls: type) -> str:
    """A Markdown reference of a config tree: per section a heading, its doc and a table of its settings."""
    return "\n".join(_reference_blocks(cls, "", cls.__doc__ or ""))


def _reference_blocks(cls: type, prefix: str, doc: str) -> list[str]:
    rows, nested = ["| key | type | default | doc |", "|---|---|---|---|"], []
    for spec in fields(cls):
        hint, text = _field_hints(cls)[spec.name], spec.metadata.get("doc")
        if not text:
            raise TypeError(f"{cls.__name__}.{spec.name}: config fields need metadata={{'doc': ...}}")
        if _section_type(hint) is not None:
            nested += _reference_blocks(_section_type(hint), _join(prefix, spec.name), text)
            continue
        check = spec.metadata.get("check")
        kind = _type_name(hint) + (f", {check.expected}" if check else "")
        cells = [f"`{spec.name}`", kind, f"`{_inline_yaml(_default_of(spec))}`", text]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    title = f"`{prefix}`" if prefix else "Top level"
    return [f"### {title}", "", doc.strip(), "", *rows, "", *nested]


def _default_of(spec: dataclasses.Field) -> Any:
    if spec.default is not MISSING:
        return spec.default
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    return "(required)"


def _inline_yaml(value: Any) -> str:
    text = yaml.dump(_plain(value), Dumper=_Dumper, default_flow_style=True, width=math.inf)
    return text.removesuffix("\n").removesuffix("\n...")


def _type_name(hint: Any) -> str:
    inner = _optional_inner(hint)
    if inner is not None:
        return f"{_type_name(inner)} or null"
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(hint))
    if get_origin(hint) in (tuple, list):
        return f"list of {_type_name(get_args(hint)[0])}"
    if hint is dict or get_origin(hint) is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))

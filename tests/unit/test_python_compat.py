"""The code parses and imports on Python 3.10, the oldest version setup.py accepts, checked without a 3.10 interpreter.

Two checks over every .py file of the packages, the tests and the benchmarks:
- `ast.parse(..., feature_version=(3, 10))` refuses syntax newer than 3.10 (`except*`, `a[*b]`, ...);
- an AST walk refuses the standard-library names below, which exist only from 3.11 or 3.12 on and would fail
  at import time (`from typing import Self` broke every `distill` command on 3.10 once). The list is short on
  purpose: the names this code base is likely to reach for, each with the version that added it.
  `typing_extensions` backports them if ever needed. Cost: behaviour changes inside old names (say, what
  `datetime.fromisoformat` accepts) are not seen here; a 3.10 run of the unit tests covers those.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("pipeline", "tokenization", "tests", "benchmarks")

# module -> names added after 3.10 (version added)
NEWER_NAMES = {
    "typing": {"Self": "3.11", "Never": "3.11", "LiteralString": "3.11", "assert_never": "3.11",
               "assert_type": "3.11", "reveal_type": "3.11", "Required": "3.11", "NotRequired": "3.11",
               "TypeVarTuple": "3.11", "Unpack": "3.11", "dataclass_transform": "3.11", "override": "3.12"},
    "enum": {"StrEnum": "3.11", "ReprEnum": "3.11", "verify": "3.11"},
    "datetime": {"UTC": "3.11"},
    "asyncio": {"TaskGroup": "3.11", "timeout": "3.11"},
    "contextlib": {"chdir": "3.11"},
    "hashlib": {"file_digest": "3.11"},
    "itertools": {"batched": "3.12"},
}
NEWER_MODULES = {"tomllib": "3.11"}
NEWER_BUILTINS = {"ExceptionGroup": "3.11", "BaseExceptionGroup": "3.11"}


def newer_than_310(source: str, filename: str = "<src>") -> list[str]:
    """Every use in `source` of syntax or a standard-library name that Python 3.10 lacks, as readable lines."""
    try:
        tree = ast.parse(source, filename, feature_version=(3, 10))
    except SyntaxError as err:
        return [f"{filename}:{err.lineno}: syntax newer than 3.10: {err.msg}"]
    found = []

    def flag(node: ast.AST, what: str, version: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what} needs Python {version}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in NEWER_MODULES:
                    flag(node, f"import {alias.name}", NEWER_MODULES[alias.name])
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if node.module in NEWER_MODULES:
                flag(node, f"from {node.module} import", NEWER_MODULES[node.module])
            for alias in node.names:
                version = NEWER_NAMES.get(node.module or "", {}).get(alias.name)
                if version:
                    flag(node, f"from {node.module} import {alias.name}", version)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            version = NEWER_NAMES.get(node.value.id, {}).get(node.attr)
            if version:
                flag(node, f"{node.value.id}.{node.attr}", version)
        elif isinstance(node, ast.Name) and node.id in NEWER_BUILTINS:
            flag(node, node.id, NEWER_BUILTINS[node.id])
    return found


def python_files() -> list[Path]:
    return sorted(path for folder in FOLDERS for path in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("snippet, expected", [
    ("from typing import Optional, Self\n", "from typing import Self needs Python 3.11"),
    ("import typing\nx: typing.Never\n", "typing.Never needs Python 3.11"),
    ("import tomllib\n", "import tomllib needs Python 3.11"),
    ("import datetime\nnow = datetime.datetime.now(datetime.UTC)\n", "datetime.UTC needs Python 3.11"),
    ("raise ExceptionGroup('x', [ValueError()])\n", "ExceptionGroup needs Python 3.11"),
    ("try:\n    pass\nexcept* ValueError:\n    pass\n", "syntax newer than 3.10"),
])
def test_checker_flags_what_310_lacks(snippet, expected):
    found = newer_than_310(snippet)
    assert len(found) == 1 and expected in found[0], found


def test_checker_passes_what_310_has():
    ok = ("from typing import Optional, TypeAlias\nimport datetime\nz = datetime.timezone.utc\n"
          "match z:\n    case _:\n        pass\nwith (open('a') as a, open('b') as b):\n    pass\n")
    assert newer_than_310(ok) == []


def test_code_runs_on_python_310():
    files = python_files()
    assert len(files) > 50 and ROOT / "pipeline" / "cli.py" in files
    found = [line for path in files for line in newer_than_310(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "Python 3.10 is supported (setup.py python_requires):\n" + "\n".join(found)

"""README.md's config reference is the one the config dataclasses generate today, and it documents every key
with the default the program really uses."""
from __future__ import annotations

import re

import pytest
import yaml

from pipeline import reference_doc
from pipeline.cli import CONFIG_KINDS, main

README_KINDS = ("train", "cache", "quickstart")  # `--kind loss` (the loss sections alone) is not a command


def test_config_reference_is_current():
    assert reference_doc.main(["--check"]) == 0, "run: .venv/bin/python -m pipeline.reference_doc"


def readme_tables(kind: str) -> dict[str, dict[str, object]]:
    """README's reference of `distill <kind>` read back: {section ('' = top level): {key: default}}."""
    text = reference_doc.README.read_text()
    match = re.search(rf"<details><summary><code>distill {kind}</code>.*?</details>", text, flags=re.S)
    assert match, f"README.md has no config reference block for distill {kind}"
    tables: dict[str, dict[str, object]] = {}
    section = None
    for line in match.group(0).splitlines():
        if heading := re.fullmatch(r"#### (?:Top level|`(.+)`)", line):
            section = heading.group(1) or ""
            tables[section] = {}
        elif line.startswith("| `"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
            tables[section][cells[0].strip("`")] = yaml.safe_load(cells[2].strip("`"))
    return tables


def resolved_defaults(kind: str, capsys) -> dict:
    """What `distill config --kind <kind>` prints: the defaults as the program loads them."""
    main(["config", "--kind", kind])
    return yaml.safe_load(capsys.readouterr().out)


def flatten(tree: dict, sections: set[str], prefix: str = "") -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {prefix: {}}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and path in sections:
            out.update(flatten(value, sections, path))
        else:
            out[prefix][key] = value
    return out


@pytest.mark.parametrize("kind", README_KINDS)
def test_readme_documents_every_key_with_its_real_default(kind, capsys):
    documented = readme_tables(kind)
    assert flatten(resolved_defaults(kind, capsys), set(documented)) == documented


def test_every_command_config_is_documented():
    assert set(README_KINDS) == set(CONFIG_KINDS) - {"loss"}

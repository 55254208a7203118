"""README.md's config reference is the one the config dataclasses generate today."""
from __future__ import annotations

from pipeline import reference_doc


def test_config_reference_is_current():
    assert reference_doc.main(["--check"]) == 0, "run: .venv/bin/python -m pipeline.reference_doc"


def test_reference_covers_every_command_config():
    block = reference_doc.render()
    for kind, _, cls in reference_doc.KINDS:
        assert f"--kind {kind} --reference" in block and cls.__name__ in block
    assert "#### `data`" in block and "`teacher_run`" in block

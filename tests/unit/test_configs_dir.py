"""Every YAML file in configs/ loads into its root config class and round-trips through dump_yaml."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import CacheConfig, RunConfig, TrainConfig, dump_yaml, load_config
from pipeline.quickstart.settings import QuickstartConfig

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"

ROOT_BY_PREFIX: dict[str, type] = {"loss_": RunConfig, "cache_": CacheConfig, "student_": TrainConfig,
                                   "fdistill_": TrainConfig, "quickstart": QuickstartConfig}
"""Which root class a config file fills, by file-name prefix; RunConfig for any other name."""


def root_class(path: Path) -> type:
    return next((cls for prefix, cls in ROOT_BY_PREFIX.items() if path.name.startswith(prefix)), RunConfig)


def test_configs_dir_has_configs():
    assert sorted(CONFIGS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", sorted(CONFIGS_DIR.glob("*.yaml")), ids=lambda path: path.name)
def test_config_validates_and_round_trips(path, tmp_path):
    cls = root_class(path)
    cfg = load_config(cls, path)
    dumped = tmp_path / path.name
    dumped.write_text(dump_yaml(cfg))
    assert load_config(cls, dumped) == cfg


def test_quickstart_yaml_is_the_built_in_default():
    """configs/quickstart.yaml shows the defaults `distill quickstart` runs without --config; they must agree."""
    assert load_config(QuickstartConfig, CONFIGS_DIR / "quickstart.yaml") == QuickstartConfig()

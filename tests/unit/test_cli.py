"""The `distill` command: in process for its behaviour, as real subprocesses for the entry points."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import RunConfig, TrainConfig, config_reference, load_config

REPO = Path(__file__).resolve().parents[2]
DISTILL = Path(sys.executable).parent / "distill"
EXAMPLE = "configs/loss_default.yaml"


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_console_script_prints_the_resolved_config_with_the_override():
    done = run(str(DISTILL), "config", "--config", EXAMPLE, "loss.divergence=js")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["loss"]["divergence"] == "js"
    assert resolved["parallel"]["tp"] == 1 and resolved["loss"]["temperature"] == 1.0


def test_console_script_bad_key_exits_2_with_the_message_and_no_traceback():
    done = run(str(DISTILL), "config", "--config", EXAMPLE, "loss.temprature=2.0")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("distill: error: command line: loss.temprature: unknown key (got 2.0 (float));")
    assert "did you mean 'temperature'?" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_and_config_import_no_torch():
    """cli.py's promise: `distill --help` and config checks come back without importing torch (seconds)."""
    probe = ("import sys\nfrom pipeline.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             f"main(['config', '--config', '{EXAMPLE}'])\n"
             "heavy = [m for m in ('torch', 'deepspeed', 'megatron', 'transformers') if m in sys.modules]\n"
             "sys.exit(f'imported {heavy}' if heavy else 0)\n")
    done = run(sys.executable, "-c", probe)
    assert done.returncode == 0, done.stderr
    assert "usage: distill" in done.stdout and "loss:" in done.stdout


def test_python_dash_m_pipeline_runs_the_same_command():
    done = run(sys.executable, "-m", "pipeline", "config", "--config", EXAMPLE, "parallel.tp=2")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["parallel"]["tp"] == 2


def test_config_without_a_file_prints_the_defaults(capsys):
    assert main(["config", "loss.temperature=2"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["loss"]["temperature"] == 2.0 and resolved["loss"]["divergence"] == "kl"


def test_file_errors_name_the_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("loss:\n  temperature: -1.0\n")
    assert main(["config", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"distill: error: {path}: loss.temperature: expected > 0, got -1.0\n"
    assert captured.out == ""


def test_missing_file_exits_2(tmp_path, capsys):
    assert main(["config", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert capsys.readouterr().err == f"distill: error: {tmp_path / 'absent.yaml'}: config file not found\n"


def test_reference_prints_the_markdown_reference(capsys):
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == config_reference(RunConfig)


def test_config_kind_follows_the_file_name_or_kind(capsys):
    configs = Path(__file__).resolve().parents[2] / "configs"
    assert main(["config", "--config", str(configs / "student_kd.yaml"), "schedule.steps=7"]) == 0
    assert load_config(TrainConfig, None, ["schedule.steps=7"]).schedule.steps == 7
    assert "steps: 7" in capsys.readouterr().out
    assert main(["config", "--kind", "train", "--reference"]) == 0
    assert capsys.readouterr().out == config_reference(TrainConfig)
    assert main(["config", "--config", str(configs / "student_kd.yaml"), "optim.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["config", "--reference", "loss.temperature=2"],
                                  ["config", "--reference", "--config", EXAMPLE], ["export"],
                                  ["config", "--kind", "student"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_help_explains_the_stages_and_offers_the_built_ones(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    for stage in ("tokenize", "cache", "train", "export"):
        assert f"  {stage} " in text
    commands = text.split("positional arguments:")[1]
    assert "config" in commands and "check a config and print it resolved" in commands
    offered = {line.split()[0] for line in commands.splitlines() if line.startswith("    ") and line.strip()}
    assert {"tokenize", "verify-shards", "cache", "verify-cache", "convert", "inspect", "train", "export"} <= offered

"""`distill convert` and `distill inspect` as a user runs them, and the TP checkpoint they write.

The round trip HF → TP checkpoint → HF must give back the original tensors bit for bit, a TP
checkpoint must load into the model it was split for (and refuse another layout), and bad input must
exit 2 with a message naming the problem and leave any existing output alone.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.config import ComputeConfig
from pipeline.model import CheckpointError, load_model
from pipeline.model.tp_checkpoint import rank_file
from tests.modelmaker import VOCAB, hf_logits, make_hf_model, random_tokens, read_safetensors

DISTILL = Path(sys.executable).parent / "distill"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "llama"
    model = make_hf_model("llama_gqa", folder)
    return folder, model


def test_hf_to_tp_to_hf_gives_the_original_tensors_back(llama, tmp_path):
    folder, _ = llama
    assert main(["convert", "hf-to-tp", str(folder), str(tmp_path / "tp"), "--tp", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "tp").iterdir()) == [
        "layout.json", "model.yaml", rank_file(0, 2), rank_file(1, 2)]
    layout = json.loads((tmp_path / "tp" / "layout.json").read_text())
    assert (layout["tp"], layout["padded_vocab"], layout["dtype"]) == (2, 512, "float32")
    assert main(["convert", "tp-to-hf", str(tmp_path / "tp"), str(tmp_path / "back")]) == 0
    original, back = read_safetensors(folder), read_safetensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert torch.equal(tensor, back[name]), name
    assert not (tmp_path / "tp.partial").exists() and not (tmp_path / "back.partial").exists()


def test_tp1_checkpoint_loads_and_matches_transformers(llama, tmp_path, single_process_group):
    folder, reference = llama
    assert main(["convert", "hf-to-tp", str(folder), str(tmp_path / "tp1"), "--tp", "1"]) == 0
    from pipeline.parallel import ParallelContext

    with ParallelContext.from_env(tp=1) as ctx:
        model = load_model(tmp_path / "tp1", ctx).eval()
        tokens = random_tokens()
        with torch.no_grad():
            ours = model(tokens)[..., :VOCAB]
        torch.testing.assert_close(ours, hf_logits(reference, tokens), atol=1e-4, rtol=0)
        with pytest.raises(CheckpointError, match=r"split for tp=1, vocab_multiple=128; this job has .*multiple=64"):
            load_model(tmp_path / "tp1", ctx, ComputeConfig(vocab_multiple=64))


def test_bf16_conversion_stores_bf16(llama, tmp_path):
    folder, _ = llama
    assert main(["convert", "hf-to-tp", str(folder), str(tmp_path / "tp"), "--tp", "2", "--dtype", "bfloat16"]) == 0
    tensors = read_safetensors(tmp_path / "tp")
    assert tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_existing_output_is_refused_and_kept(llama, tmp_path, capsys):
    folder, _ = llama
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", "hf-to-tp", str(folder), str(out), "--tp", "2"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["convert", "hf-to-tp", str(folder), str(out), "--tp", "2", "--force"]) == 0
    assert not (out / "keep.txt").exists()


def test_unsplittable_tp_and_missing_flags_are_clear_errors(llama, tmp_path, capsys):
    folder, _ = llama
    assert main(["convert", "hf-to-tp", str(folder), str(tmp_path / "x"), "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert "num_heads=4 is not divisible by tp=3" in err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "hf-to-tp", str(folder), str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "needs --tp N" in capsys.readouterr().err


def test_inspect_reports_the_facts_a_user_needs(llama, capsys):
    folder, reference = llama
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    total = sum(p.numel() for p in reference.parameters())
    assert f"parameters       {total:,}" in out
    assert "4 heads, 2 key/value heads, head dim 16" in out
    assert "scaling llama3 ×8" in out and "untied" in out
    assert "vocabulary       300; padded for tp 1: 384, 2: 512" in out
    assert "splits over tp   1, 2, 4 (CUDA only)" in out


def test_inspect_shows_both_counts_when_files_and_config_disagree(llama, tmp_path, capsys):
    import shutil

    folder, reference = llama
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["intermediate_size"] += 8
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(copy)]) == 0
    total = sum(p.numel() for p in reference.parameters())
    extra = 3 * 8 * config["hidden_size"] * config["num_hidden_layers"]  # gate, up and down grow by 8 rows/columns
    assert (f"WARNING          the files hold {total:,} parameters but config.json describes {total + extra:,}"
            in capsys.readouterr().out)
    assert main(["inspect", str(folder)]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_inspect_of_a_folder_without_a_checkpoint_exits_2(tmp_path):
    done = subprocess.run([str(DISTILL), "inspect", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"distill: error: {tmp_path}: no config.json (expected a Hugging Face model folder)"

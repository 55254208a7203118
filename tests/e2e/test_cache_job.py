"""The teacher-cache job end to end on a tiny Llama teacher: cache, join, decode, restart, refuse.

The teacher is a real Hugging Face folder (tests/modelmaker.py), the token shards real webdataset tars
(tests/shardmaker.py). The job runs through `distill cache` in-process (a world of one) or as a
subprocess where it must be killed. Targets read back through the data reader's sidecar join must
equal the teacher's own top-K computed here from its full logits. Every test builds what it reads: the
caches several tests read are module fixtures, so any one test runs alone.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from pipeline.data import Source, TokenShardDataset
from pipeline.losses.api import distill_loss
from pipeline.teacher.reader import CacheTargets
from tests.modelmaker import VOCAB, make_hf_model
from tests.shardmaker import make_token_shards

ROOT = Path(__file__).resolve().parents[2]
SEQ = 16
SIZES = (5, 3, 4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    make_token_shards(base / "tokens", SIZES, seq_len=SEQ, vocab_size=VOCAB, seed=4)
    model = make_hf_model("llama_gqa", base / "teacher")
    return base, model


def cache(base: Path, out: str | Path, *extra: str, shards: str | None = None) -> int:
    return main(["cache", *([f"--shards={shards}"] if shards else []), f"teacher={base / 'teacher'}",
                 f"tokens={base / 'tokens'}", f"output={base / out}", "progress=false", "micro_batch=2", *extra])


@pytest.fixture(scope="module")
def topk_cache(world) -> Path:
    base, _ = world
    assert cache(base, "topk", "targets.k=8") == 0
    return base / "topk"


@pytest.fixture(scope="module")
def sampled_cache(world) -> Path:
    base, _ = world
    assert cache(base, "sampled_a", "targets.mode=sampled", "targets.draws=20") == 0
    return base / "sampled_a"


def shard_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))} | {
        "manifest.json": (folder / "manifest.json").read_bytes()}


def test_topk_cache_decodes_to_the_teachers_targets(world, topk_cache):
    base, model = world
    manifest = json.loads((topk_cache / "manifest.json").read_text())
    assert manifest["extra"]["targets"]["k"] == 8 and manifest["extra"]["bytes_per_token"] > 0
    reader = CacheTargets(str(topk_cache))
    data = TokenShardDataset(Source(str(base / "tokens"), sidecars={"teacher": str(topk_cache)}), micro_batch=3,
                             dp_rank=0, dp_size=1, seed=0, shuffle=True, verify=True)
    batch = data.batch(1)
    targets = reader.targets(batch)
    with torch.no_grad():
        logp = torch.log_softmax(model(batch["tokens"][:, :-1]).logits.double(), dim=-1)  # [B, S, V]
    want_ids = logp.topk(8, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(targets.ids, want_ids)
    bound = reader.record["ratio_error_bound"]
    ratio = (targets.logprobs.double() - targets.logprobs.double().amax(-1, keepdim=True)).exp()
    want = logp.gather(-1, want_ids)
    want_ratio = (want - want.amax(-1, keepdim=True)).exp()
    assert (ratio - want_ratio).abs().max() <= bound * 1.05 + 1e-4
    rest = logp.scatter(-1, want_ids, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(targets.log_rest.double(), rest, rtol=1e-5, atol=1e-5)
    loss = distill_loss(model(batch["tokens"][:, :-1]).logits.detach(), targets, divergence="kl")
    assert loss.loss.item() < 0.02, "the teacher against its own decoded targets should have ~0 divergence"


def test_sampled_cache_is_reproducible(world, sampled_cache):
    base, _ = world
    assert cache(base, "sampled_b", "targets.mode=sampled", "targets.draws=20", "micro_batch=5") == 0
    assert shard_bytes(sampled_cache) == shard_bytes(base / "sampled_b")
    reader = CacheTargets(str(sampled_cache))
    data = TokenShardDataset(Source(str(base / "tokens"), sidecars={"teacher": str(sampled_cache)}),
                             micro_batch=4, dp_rank=0, dp_size=1, seed=0)
    targets = reader.targets(data.batch(0))
    assert targets.counts.shape[:2] == (4, SEQ) and (targets.counts.sum(-1) == 20).all()
    assert assert_sorted_unique(targets.ids)


def assert_sorted_unique(ids: torch.Tensor) -> bool:
    real = ids >= 0
    steps = ids[..., 1:] - ids[..., :-1]
    return bool(((steps > 0) | ~real[..., 1:]).all())


def test_kill_and_rerun_is_byte_identical(world, tmp_path):
    base, _ = world
    many = tmp_path / "tokens"
    make_token_shards(many, (3,) * 12, seq_len=SEQ, vocab_size=VOCAB, seed=9)
    settings = ["cache", f"teacher={base / 'teacher'}", f"tokens={many}", "progress=false", "micro_batch=1",
                "targets.k=4"]
    out = tmp_path / "killed"  # the killed run is a process of its own; the uninterrupted one needs none
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *settings, f"output={out}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    visible_seen = _kill_after_first_shards(proc, out, shards=3)
    assert main([*settings, f"output={tmp_path / 'whole'}"]) == 0
    for name, data in visible_seen.items():
        assert data == (tmp_path / "whole" / name).read_bytes(), f"{name} was visible before it was complete"
    assert not (out / "manifest.json").exists()
    assert main([*settings, f"output={out}"]) == 0
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert not list(out.glob(".*.partial"))


def _kill_after_first_shards(proc: subprocess.Popen, out: Path, shards: int) -> dict:
    """SIGKILL the job once `shards` shards are visible; return the bytes of every visible shard then."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.glob("*.tar"))) >= shards:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    return {p.name: p.read_bytes() for p in out.glob("*.tar")}


def test_array_tasks_with_other_settings_are_refused_and_with_the_same_complete_the_cache(world, tmp_path, capsys):
    base, _ = world
    out = tmp_path / "guarded"
    assert cache(base, out, "targets.k=4", shards="0:1") == 0  # task 0 of a job array: the first shard
    assert not (out / "manifest.json").exists()
    first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert len(first) == 1
    capsys.readouterr()
    assert cache(base, out, "targets.k=5", shards="1:3") == 2  # another task, other settings
    assert "different teacher or settings (targets.k differ)" in capsys.readouterr().err
    make_hf_model("llama_gqa", tmp_path / "other_teacher", seed=1)
    assert main(["cache", "--shards=1:3", f"teacher={tmp_path / 'other_teacher'}", f"tokens={base / 'tokens'}",
                 f"output={out}", "progress=false", "targets.k=4"]) == 2
    assert "(teacher.weights_sha256 differ)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == first, "a refused task wrote or overwrote"
    assert cache(base, out, "targets.k=4", shards="1:3") == 0  # the same settings: the array completes
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == len(SIZES) and manifest["extra"]["targets"]["k"] == 4
    assert {name: (out / name).read_bytes() for name in first} == first


def test_token_shard_that_changed_since_its_manifest_is_refused(world, tmp_path, capsys):
    import shutil

    base, _ = world
    tokens = tmp_path / "tokens"
    shutil.copytree(base / "tokens", tokens)
    shard = min(tokens.glob("*.tar.gz"))
    data = bytearray(shard.read_bytes())
    data[9] ^= 1  # gzip's operating-system byte: the shard still reads, only its sha256 tells
    shard.write_bytes(bytes(data))
    code = main(["cache", f"teacher={base / 'teacher'}", f"tokens={tokens}", f"output={tmp_path / 'out'}",
                 "progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and shard.name in err and "sha256" in err
    assert not list((tmp_path / "out").glob("*.tar"))


def test_nan_teacher_names_the_sample(world, tmp_path, capsys):
    base, _ = world
    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "nan_teacher"
    make_hf_model("llama_gqa", teacher)
    weights = load_file(teacher / "model.safetensors")
    weights["model.norm.weight"][:] = float("nan")
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    code = main(["cache", f"teacher={teacher}", f"tokens={base / 'tokens'}", f"output={tmp_path / 'out'}",
                 "progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and "NaN or infinite" in err and "shard-000000" in err
    assert not list((tmp_path / "out").glob("*.tar"))


def test_tokenizer_mismatch_is_refused(world, tmp_path, capsys):
    base, _ = world
    from tokenization.tokenizer import train_tokenizer

    teacher = tmp_path / "teacher_tok"
    make_hf_model("llama_gqa", teacher)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a small corpus for a tokenizer\n" * 20)
    train_tokenizer([corpus], vocab_size=280, out_path=teacher / "tokenizer.json")
    code = main(["cache", f"teacher={teacher}", f"tokens={base / 'tokens'}", f"output={tmp_path / 'out'}",
                 "progress=false"])
    assert code == 2 and "tokenizer" in capsys.readouterr().err


def test_missing_paths_are_config_errors(capsys):
    assert main(["cache", "progress=false"]) == 2
    assert "teacher: is required" in capsys.readouterr().err


def test_verify_cache_with_teacher(world, topk_cache, capsys):
    base, _ = world
    capsys.readouterr()
    assert main(["verify-cache", str(topk_cache), "--tokens", str(base / "tokens"),
                 "--teacher", str(base / "teacher"), "--positions", "40"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["positions_checked"] >= 40 and report["id_mismatch"] == 0
    assert report["max_ratio_error"] <= report["ratio_error_bound"] and 0 <= report["kl_mean"] < 0.01


def test_verify_sampled_cache_reproduces_draws(world, sampled_cache, capsys):
    base, _ = world
    capsys.readouterr()
    assert main(["verify-cache", str(sampled_cache), "--tokens", str(base / "tokens"),
                 "--teacher", str(base / "teacher"), "--positions", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["draws_reproduced"] == 1.0


def test_verify_cache_reports_a_corrupt_shard_and_a_foreign_source(world, topk_cache, tmp_path, capsys):
    import shutil

    base, _ = world
    copy = tmp_path / "copy"
    shutil.copytree(topk_cache, copy)
    shard = sorted(copy.glob("*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify-cache", str(copy), "--tokens", str(base / "tokens")]) == 1
    assert f"{shard.name}" in capsys.readouterr().out
    other = tmp_path / "other_tokens"
    make_token_shards(other, SIZES, seq_len=SEQ, vocab_size=VOCAB, seed=5)
    assert main(["verify-cache", str(topk_cache), "--tokens", str(other)]) == 1
    assert "sha256" in capsys.readouterr().out

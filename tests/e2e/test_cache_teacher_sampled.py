"""The teacher-sampled cache job (`prefixes.source: teacher`) end to end on a tiny Llama teacher.

The generated samples are checked against `pipeline.generate.generate` called here on the same teacher
with the same keys and seed, the prompts against the source shards, the mask and the EOS padding against
their definition; the targets, which the job takes from the decoder's own logits (one pass), against a
full forward of the teacher over each generated sample (here, and by `verify-cache --teacher`); a
killed run against an uninterrupted one, byte for byte; and the trainer reads the pair. The token
shards' EOS id is set to the first token the teacher draws for the first sample, so that row stops at
EOS after one token and others may stop early too: the draws do not depend on the EOS id.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import CacheConfig, load_config
from pipeline.teacher.sampled_prefixes import continued_sample
from tests.harness import run_distributed
from tests.modelmaker import VOCAB, make_hf_model
from tests.shardmaker import make_token_shards
from tests.trainkit import losses, student_overrides, train_config
from tokenization.format import read_manifest, read_samples, write_manifest

ROOT = Path(__file__).resolve().parents[2]
SEQ, PROMPT, MAX_NEW, SEED = 16, 5, 8, 7


def settings(base: Path, out: Path, *extra: str, tokens: Path | None = None) -> list[str]:
    return ["cache", f"teacher={base / 'teacher'}", f"tokens={tokens or base / 'tokens'}", f"output={out}",
            "progress=false", "micro_batch=2", f"seed={SEED}", "targets.k=8", "prefixes.source=teacher",
            f"prefixes.prompt_len={PROMPT}", f"prefixes.sampling.max_new_tokens={MAX_NEW}", *extra]


def samples_of(folder: Path) -> dict:
    """{key: raw sample} of every shard in a token-shard folder."""
    out = {}
    for shard in sorted(folder.glob("*.tar.gz")):
        with open(shard, "rb") as stream:
            out.update({s["__key__"]: s for s in read_samples(stream, compressed=True, where=str(shard))})
    return out


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def direct_generation(base: Path, prompts: list, keys: list, eos_id, max_new: int):
    """`generate` on the teacher at TP 1, as a user would call it: the reference for the job's samples."""
    from pipeline.config import ComputeConfig, SamplingConfig
    from pipeline.generate import generate
    from pipeline.model import load_model
    from pipeline.parallel import ParallelContext

    sampling = dataclasses.replace(load_config(CacheConfig).prefixes.sampling, max_new_tokens=max_new)
    assert isinstance(sampling, SamplingConfig) and sampling.top_k == 30 and sampling.temperature == 1.0
    with ParallelContext.from_env(tp=1) as ctx:
        model = load_model(base / "teacher", ctx, ComputeConfig()).eval()
        return generate(model, [torch.from_numpy(p.astype(np.int64)) for p in prompts], keys, sampling,
                        vocab_size=VOCAB, eos_id=eos_id, seed=SEED)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("teacher_sampled")
    manifest = make_token_shards(base / "tokens", (5, 3, 4), seq_len=SEQ, vocab_size=VOCAB, seed=4)
    make_hf_model("llama_gqa", base / "teacher")
    first = samples_of(base / "tokens")["shard-000000-000000"]
    prompt = npy(first["tokens.npy"])[:PROMPT]
    eos = int(direct_generation(base, [prompt], ["shard-000000-000000"], None, 1).tokens[0][0])
    write_manifest(base / "tokens", dataclasses.replace(manifest, eos_id=eos))
    out = base / "out"
    assert main(settings(base, out)) == 0
    return base, out, eos


def test_generated_samples_are_the_prompt_and_the_teachers_own_continuation(world):
    base, out, eos = world
    source, generated = samples_of(base / "tokens"), samples_of(out / "generated")
    assert list(generated) == list(source), "the generated samples keep the source keys, in order"
    keys = list(source)
    prompts = [npy(source[key]["tokens.npy"])[:PROMPT] for key in keys]
    want = direct_generation(base, prompts, keys, eos, MAX_NEW)
    ended_early = 0
    for key, prompt, new, ended in zip(keys, prompts, want.tokens, want.ended):
        tokens, segments, mask = (npy(generated[key][m]) for m in ("tokens.npy", "segments.npy", "mask.npy"))
        end = PROMPT + len(new)
        assert np.array_equal(tokens[:PROMPT], prompt), key
        assert np.array_equal(tokens[PROMPT:end], new.numpy()), key
        assert (tokens[end:] == eos).all(), f"{key}: padding after the end must be EOS"
        assert segments.tolist() == [0, end] and segments.dtype == np.int32
        assert ended == (new[-1].item() == eos) and (ended or len(new) == MAX_NEW)
        ended_early += ended and len(new) < MAX_NEW
        positions = np.arange(SEQ)
        assert mask.dtype == np.uint8 and mask.shape == (SEQ,)
        assert np.array_equal(mask, ((positions >= PROMPT - 1) & (positions < end - 1)).astype(np.uint8)), key
    assert len(want.tokens[0]) == 1 and want.ended[0], "the first row's first draw is the EOS id"
    assert ended_early >= 1


def test_manifests_record_the_settings_and_join(world, capsys):
    base, out, eos = world
    cache, tokens = json.loads((out / "manifest.json").read_text()), read_manifest(out / "generated")
    assert tokens.packing == "bestfit" and tokens.eos_id == eos and tokens.seq_len == SEQ
    assert cache["extra"]["source_shards"] == {s.name: s.sha256 for s in tokens.shards}
    sampling = {"mode": "sample", "temperature": 1.0, "top_k": 30, "top_p": 1.0, "max_new_tokens": MAX_NEW}
    for prefixes in (cache["extra"]["prefixes"], tokens.extra["prefixes"], cache["extra"]["job"]["prefixes"]):
        assert prefixes == {"source": "teacher", "prompt_len": PROMPT, "loss_on": "generated", "sampling": sampling}
    assert tokens.extra["seed"] == SEED and tokens.extra["mask_member"] == "mask.npy"
    generated = samples_of(out / "generated")
    assert tokens.total_tokens == sum(int(npy(s["segments.npy"])[-1]) for s in generated.values())
    assert main(["verify-shards", str(out / "generated")]) == 0
    capsys.readouterr()
    assert main(["verify-cache", str(out), "--tokens", str(out / "generated"), "--teacher", str(base / "teacher"),
                 "--positions", "200"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["positions_checked"] >= 100 and report["id_mismatch"] == 0 and report["kl_mean"] < 0.01


def test_continued_sample_masks_generated_or_all_real_labels():
    prompt, new = np.array([3, 4, 5]), np.array([6, 9])
    tokens, segments, mask = continued_sample(prompt, new, seq_len=7, eos_id=9, dtype=np.uint16, loss_on="generated")
    assert tokens.tolist() == [3, 4, 5, 6, 9, 9, 9, 9] and tokens.dtype == np.uint16
    assert segments.tolist() == [0, 5]
    assert mask.tolist() == [0, 0, 1, 1, 0, 0, 0]  # labels 6 (at t=2) and 9 (t=3) are generated
    _, _, mask = continued_sample(prompt, new, seq_len=7, eos_id=9, dtype=np.uint16, loss_on="all")
    assert mask.tolist() == [1, 1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("override, key", [(f"prefixes.prompt_len={SEQ + 1}", "prefixes.prompt_len"),
                                           ("prefixes.sampling.mode=beam", "prefixes.sampling.mode"),
                                           ("prefixes.loss_on=prompt", "prefixes.loss_on")])
def test_bad_settings_are_errors_naming_the_field(world, tmp_path, capsys, override, key):
    base, _, _ = world
    assert main(settings(base, tmp_path / "out", override)) == 2
    err = capsys.readouterr().err
    assert f"{key}:" in err and ("seq_len = 16" in err if "prompt_len" in key else "expected one of" in err)
    assert not (tmp_path / "out").exists(), "nothing may be written for a bad setting"


def test_generated_folder_must_not_be_the_output_and_other_settings_are_refused(world, tmp_path, capsys):
    base, out, _ = world
    assert main(settings(base, tmp_path / "o", f"generated={tmp_path / 'o'}")) == 2
    assert "generated:" in capsys.readouterr().err
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(settings(base, out, "prefixes.prompt_len=4")) == 2
    assert "prefixes.prompt_len differ" in capsys.readouterr().err
    assert main(settings(base, out, "prefixes.sampling.top_k=5")) == 2
    assert "prefixes.sampling.top_k differ" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def folder_bytes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for folder in (out, out / "generated")
            for p in sorted(folder.glob("*.tar*")) + [folder / "manifest.json"]}


def test_kill_and_rerun_is_byte_identical(world, tmp_path):
    base, _, _ = world
    many = tmp_path / "tokens"
    make_token_shards(many, (3,) * 10, seq_len=SEQ, vocab_size=VOCAB, seed=9)

    def run(out: Path) -> list[str]:  # max_new_tokens above the room left: rows may run to seq_len + 1 tokens
        return settings(base, out, "micro_batch=1", "prefixes.sampling.max_new_tokens=64", tokens=many)

    killed = tmp_path / "killed"  # the killed run is a process of its own; the uninterrupted one needs none
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *run(killed)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not list(killed.glob("*.tar")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    visible = {str(p.relative_to(killed)): p.read_bytes() for p in [*killed.glob("*.tar"),
                                                                    *killed.glob("generated/*.tar.gz")]}
    assert not (killed / "manifest.json").exists() and not (killed / "generated" / "manifest.json").exists()
    assert main(run(tmp_path / "whole")) == 0
    whole = folder_bytes(tmp_path / "whole")
    assert len(whole) == 22 and visible
    for name, data in visible.items():
        assert data == whole[name], f"{name} was visible before it was complete"
    assert main(run(killed)) == 0
    assert folder_bytes(killed) == whole
    assert not list(killed.rglob(".*.partial"))
    ends = [int(npy(s["segments.npy"])[-1]) for s in samples_of(killed / "generated").values()]
    assert max(ends) == SEQ + 1, "with max_new_tokens above the room, a row runs to seq_len + 1 tokens"


def _train(rank: int, world: int, run_dir: str, tokens: str, cache: str) -> dict:
    from pipeline.train.run import run_training

    overrides = student_overrides(Path(run_dir), Path(tokens), Path(cache), steps=2, log__tensorboard="false")
    assert run_training(train_config(overrides)) == 0
    return losses(Path(run_dir))


def test_the_student_trains_on_the_generated_pair(world, tmp_path):
    _, out, _ = world
    found = run_distributed(_train, 1, str(tmp_path / "run"), str(out / "generated"), str(out))[0]
    assert sorted(found) == [1, 2] and all(np.isfinite(v) and v > 0 for v in found.values()), found


def test_a_padded_sample_shorter_than_the_prompt_is_continued_from_its_real_tokens(world, tmp_path):
    import hashlib

    from tokenization.format import Manifest, ShardEntry, ShardWriter, encode_sample

    base, _, eos = world
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    rng = np.random.default_rng(3)
    rows = {"short": 3, "whole": SEQ + 1}  # real tokens: a bestfit sample padded after 3, and a full one
    with open(tokens / "s-0.tar.gz", "wb") as file, ShardWriter(file) as writer:
        for key, end in rows.items():
            ids = np.full(SEQ + 1, eos, dtype=np.uint16)
            ids[:end] = rng.integers(1, VOCAB, end)
            writer.write(encode_sample(key, ids, np.array([0, end], dtype=np.int32)))
    sha = hashlib.sha256((tokens / "s-0.tar.gz").read_bytes()).hexdigest()
    write_manifest(tokens, Manifest("f" * 64, VOCAB, eos, SEQ, "bestfit", (ShardEntry("s-0.tar.gz", 2, 20, sha),)))
    assert main(settings(base, tmp_path / "out", tokens=tokens)) == 0
    source, generated = samples_of(tokens), samples_of(tmp_path / "out" / "generated")
    prompts = [npy(source[key]["tokens.npy"])[: min(PROMPT, end)] for key, end in rows.items()]
    want = direct_generation(base, prompts, list(rows), eos, MAX_NEW)
    for key, prompt, new in zip(rows, prompts, want.tokens):
        ids, segments, mask = (npy(generated[key][m]) for m in ("tokens.npy", "segments.npy", "mask.npy"))
        end = len(prompt) + len(new)
        assert np.array_equal(ids[:end], np.concatenate([prompt, new.numpy()])) and segments.tolist() == [0, end]
        assert mask.nonzero()[0].tolist() == list(range(len(prompt) - 1, end - 1)), key


def cache_records(out: Path) -> dict:
    """{key: record bytes} of every cache shard of `out`, and the manifest's codec."""
    from pipeline.teacher.format import codec_of

    records = {}
    for shard in sorted(out.glob("*.tar")):
        with open(shard, "rb") as stream:
            records.update({s["__key__"]: s for s in read_samples(stream, compressed=False, where=str(shard))})
    return records, codec_of(json.loads((out / "manifest.json").read_text())["extra"]["targets"])


def full_forward_logits(base: Path, generated: dict) -> dict:
    """{key: float64 logits [end − 1, VOCAB]}: the teacher's plain forward over each whole generated sample."""
    from pipeline.config import ComputeConfig
    from pipeline.model import load_model
    from pipeline.parallel import ParallelContext

    out = {}
    with ParallelContext.from_env(tp=1) as ctx, torch.no_grad():
        model = load_model(base / "teacher", ctx, ComputeConfig()).eval()
        for key, sample in generated.items():
            end = int(npy(sample["segments.npy"])[-1])
            tokens = torch.from_numpy(npy(sample["tokens.npy"])[: end - 1].astype(np.int64))[None]
            out[key] = model(tokens)[0, :, :VOCAB].double()
    return out


def stop_kinds(generated: dict, eos: int) -> set:
    kinds = set()
    for sample in generated.values():
        tokens, end = npy(sample["tokens.npy"]), int(npy(sample["segments.npy"])[-1])
        kinds.add("eos" if tokens[end - 1] == eos and end - PROMPT < MAX_NEW else
                  "limit" if end - PROMPT == MAX_NEW else "other")
    return kinds


def test_one_pass_topk_targets_equal_a_full_forward_over_the_generated_sample(world):
    from pipeline.teacher.format import decode_record

    base, out, eos = world
    generated = samples_of(out / "generated")
    assert {"eos", "limit"} <= stop_kinds(generated, eos), "a row stopping at EOS and one at its length limit"
    records, codec = cache_records(out)
    bound = codec.ratio_error_bound()
    for key, logits in full_forward_logits(base, generated).items():
        ids, logprobs, log_rest = decode_record(codec, records[key]["topk.bin"], len(logits), where=key)
        reference = torch.log_softmax(logits, dim=-1)
        top = reference.topk(8, dim=-1).indices.sort(dim=-1).values
        assert np.array_equal(ids, top.numpy()), f"{key}: top-K ids differ from the full forward's"
        rest = reference.clone().scatter_(-1, top, float("-inf")).logsumexp(dim=-1)
        np.testing.assert_allclose(log_rest, rest.numpy(), atol=1e-4, err_msg=key)
        chosen = reference.gather(-1, top).numpy()
        want = np.exp(chosen - chosen.max(axis=1, keepdims=True))  # each entry's ratio to its row's top
        got = np.exp(logprobs - logprobs.max(axis=1, keepdims=True))
        assert np.abs(got - want).max() <= bound + 1e-5, f"{key}: ratios beyond the codec's bound {bound}"


def test_one_pass_sampled_targets_equal_a_full_forward_over_the_generated_sample(world, tmp_path):
    """Exact draws: a draw moves only where the one-pass and the full forward's logits (equal to ~1e-6)
    straddle an integer-weight boundary (~1e-5 of the mass each), so at most one position in 50 may
    differ, and there by one draw moved from one id to another."""
    from pipeline.teacher.format import decode_record
    from pipeline.teacher.job import key_uniforms
    from pipeline.teacher.targets import sampled_targets

    base, _, eos = world
    out = tmp_path / "sampled"
    assert main(settings(base, out, "targets.mode=sampled", "targets.draws=16")) == 0
    generated = samples_of(out / "generated")
    assert generated.keys() == samples_of(base / "tokens").keys() and {"eos", "limit"} <= stop_kinds(generated, eos)
    records, codec = cache_records(out)
    positions = differing = 0
    for key, logits in full_forward_logits(base, generated).items():
        ids, counts = decode_record(codec, records[key]["sampled.bin"], len(logits), where=key)
        want_ids, want_counts = sampled_targets(logits.float(), key_uniforms(SEED, key, SEQ, 16)[: len(logits)],
                                                vocab_size=VOCAB)
        for t in range(len(logits)):
            got = dict(zip(ids[t][counts[t] > 0].tolist(), counts[t][counts[t] > 0].tolist()))
            want = dict(zip(want_ids[t][want_counts[t] > 0].tolist(), want_counts[t][want_counts[t] > 0].tolist()))
            assert sum(got.values()) == 16, f"{key} position {t}: {got}"
            moved = sum(abs(got.get(i, 0) - want.get(i, 0)) for i in got.keys() | want.keys())
            assert moved in (0, 2), f"{key} position {t}: draws {got} against the full forward's {want}"
            positions, differing = positions + 1, differing + (moved > 0)
    assert positions >= 60 and differing <= positions // 50, (differing, positions)

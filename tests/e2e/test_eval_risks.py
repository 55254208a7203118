"""`distill eval`: f-DISTILL's risks equal a direct computation with `transformers`, roles are not swapped, and
a vocabulary mismatch is a clear error.

Two random tiny models of one vocabulary (tests/modelmaker.py) play student and teacher. The test draws each
model's continuations with the project's `generate` (same prompts, keys, seed and sampling as the command),
checks that every drawn token lies in the generating model's own top-k under `transformers` (so the samples
are that model's), then scores them with the OTHER model's `transformers` logits: R_llh = pooled −log
p_teacher over the student's tokens, R_cvg = pooled −log q_student over the teacher's tokens. EOS is id 0 of
the shards' manifest, set to a token the student draws third in its first row, so that row stops early and its
EOS token counts.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from tests.modelmaker import VOCAB, make_hf_model
from tests.shardmaker import make_token_shards
from tokenization.format import read_manifest, write_manifest

PROMPTS, PROMPT_LEN, TOP_K, MAX_NEW, SEED = 5, 6, 30, 12, 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("risks")
    make_token_shards(root / "heldout", [3, 4], seq_len=16, vocab_size=VOCAB)
    models = {"a": make_hf_model("llama_gqa", root / "a", seed=0), "b": make_hf_model("qwen2", root / "b", seed=1)}
    pair = {"root": root, "tokens": root / "heldout", "hf": models}
    third = int(_samples(pair, "a", eos_id=None)[1][0][2])  # row 0's draws do not depend on the EOS id
    manifest = read_manifest(root / "heldout")
    write_manifest(root / "heldout", dataclasses.replace(manifest, eos_id=third))
    pair["eos"] = third
    return pair


def _run_eval(pair, student: str, teacher: str, out: Path, *extra: str) -> dict:
    argv = ["eval", "--student", str(pair["root"] / student), "--teacher", str(pair["root"] / teacher),
            "--tokens", str(pair["tokens"]), "--prompts", str(PROMPTS), "--prompt-len", str(PROMPT_LEN),
            "--top-k", str(TOP_K), "--max-new-tokens", str(MAX_NEW), "--seed", str(SEED), "--output", str(out),
            *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def _samples(pair, name: str, eos_id: int | None = -1) -> tuple[list, list]:
    """Prompts and `name`'s continuations as `distill eval` draws them (the project's generate)."""
    from pipeline.config import RiskSamplingConfig
    from pipeline.eval.risks import heldout_prompts
    from pipeline.generate import generate
    from pipeline.model import load_model
    from pipeline.parallel import ParallelContext

    prompts, keys = heldout_prompts(str(pair["tokens"]), PROMPTS, PROMPT_LEN)
    ctx = ParallelContext.from_env(1, "gloo")
    try:
        model = load_model(pair["root"] / name, ctx).eval()
        sampling = RiskSamplingConfig(top_k=TOP_K, max_new_tokens=MAX_NEW)
        out = generate(model, prompts, keys, sampling, vocab_size=VOCAB, eos_id=pair["eos"] if eos_id == -1 else eos_id,
                       seed=SEED).tokens
    finally:
        ctx.destroy()
    return prompts, out


@torch.no_grad()
def _nll(hf_model, prompt, continuation) -> torch.Tensor:
    sequence = torch.cat([prompt, continuation])[None]
    logp = torch.log_softmax(hf_model(input_ids=sequence).logits[0].double(), dim=-1)
    start = prompt.numel() - 1
    return -logp[torch.arange(start, start + continuation.numel()), continuation]


@torch.no_grad()
def _in_top_k(hf_model, prompt, continuation) -> bool:
    logits = hf_model(input_ids=torch.cat([prompt, continuation])[None]).logits[0]
    top = logits[prompt.numel() - 1: prompt.numel() - 1 + continuation.numel()].topk(TOP_K, dim=-1).indices
    return bool((top == continuation[:, None]).any(dim=-1).all())


def _pooled(scorer, prompts, continuations) -> tuple[float, int]:
    nll = torch.cat([_nll(scorer, p, c) for p, c in zip(prompts, continuations)])
    return float(nll.mean()), nll.numel()


def test_risks_equal_a_direct_computation_with_transformers(pair, tmp_path):
    result = _run_eval(pair, "a", "b", tmp_path / "risks.json")
    prompts, student = _samples(pair, "a")
    _, teacher = _samples(pair, "b")
    hf_a, hf_b = pair["hf"]["a"], pair["hf"]["b"]
    assert all(_in_top_k(hf_a, p, c) for p, c in zip(prompts, student))  # the student's samples are its own
    assert all(_in_top_k(hf_b, p, c) for p, c in zip(prompts, teacher))
    assert student[0].numel() <= 3 and int(student[0][-1]) == pair["eos"]  # stopped at EOS, which is scored
    r_llh, llh_tokens = _pooled(hf_b, prompts, student)    # teacher scores the student's samples
    r_cvg, cvg_tokens = _pooled(hf_a, prompts, teacher)    # student scores the teacher's samples
    assert (result["llh_tokens"], result["cvg_tokens"]) == (llh_tokens, cvg_tokens)
    assert result["r_llh"] == pytest.approx(r_llh, abs=1e-5)
    assert result["r_cvg"] == pytest.approx(r_cvg, abs=1e-5)
    assert abs(r_llh - _pooled(hf_a, prompts, student)[0]) > 1e-2  # a swapped scorer would be caught above
    assert result["sampling"] == {"mode": "sample", "temperature": 1.0, "top_k": TOP_K, "top_p": 1.0,
                                  "max_new_tokens": MAX_NEW}


def test_swapping_student_and_teacher_swaps_the_risks(pair, tmp_path):
    ab = _run_eval(pair, "a", "b", tmp_path / "ab.json")
    ba = _run_eval(pair, "b", "a", tmp_path / "ba.json")
    # R_llh(a, b) is b's scoring of a's samples, which is R_cvg(b, a): the same draws, the same scorer
    assert ba["r_cvg"] == pytest.approx(ab["r_llh"], abs=1e-9)
    assert ba["r_llh"] == pytest.approx(ab["r_cvg"], abs=1e-9)
    assert abs(ab["r_llh"] - ab["r_cvg"]) > 1e-2
    # ... and not a's own scoring of them (what an implementation with the scorers swapped reports)
    prompts, a_samples = _samples(pair, "a")
    assert ab["r_llh"] == pytest.approx(_pooled(pair["hf"]["b"], prompts, a_samples)[0], abs=1e-5)
    assert abs(ab["r_llh"] - _pooled(pair["hf"]["a"], prompts, a_samples)[0]) > 1e-2


def test_mismatched_vocabularies_are_a_clear_error(pair, tmp_path, capsys):
    import transformers

    from tests.modelmaker import hf_config

    config = hf_config("llama_tied")
    config.vocab_size = VOCAB + 20
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wide")
    argv = ["eval", "--student", str(pair["root"] / "a"), "--teacher", str(tmp_path / "wide"),
            "--tokens", str(pair["tokens"]), "--prompts", "2", "--prompt-len", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(pair["root"] / "a") in err and str(tmp_path / "wide") in err
    assert f"{VOCAB}" in err and f"{VOCAB + 20}" in err


def test_trainer_logs_the_risks_that_distill_eval_measures_on_its_checkpoint(pair, tmp_path):
    from pipeline.train.monitor import read_metrics, read_scalars
    from pipeline.train.run import run_training
    from tests.trainkit import student_overrides, train_config

    make_token_shards(tmp_path / "train", [8], seq_len=16, vocab_size=VOCAB, seed=5)
    run_dir = tmp_path / "run"
    overrides = student_overrides(run_dir, tmp_path / "train", steps=2) + [
        f"data.eval_tokens={pair['tokens']}", "eval.batches=1", f"eval.teacher={pair['root'] / 'b'}",
        f"eval.risk_prompts={PROMPTS}", f"eval.prompt_len={PROMPT_LEN}", f"eval.sampling.top_k={TOP_K}",
        f"eval.sampling.max_new_tokens={MAX_NEW}", f"seed={SEED}"]
    assert run_training(train_config(overrides)) == 0
    row = [r for r in read_metrics(run_dir) if r["kind"] == "eval"][-1]
    assert row["step"] == 2
    scalars = read_scalars(run_dir / "tensorboard")
    assert scalars["eval/r_llh"] == [(2, pytest.approx(row["eval/r_llh"], rel=1e-6))]
    assert scalars["eval/r_cvg"] == [(2, pytest.approx(row["eval/r_cvg"], rel=1e-6))]
    # the checkpoint saved at the end holds the weights that step 2's eval used
    direct = _run_eval({**pair, "root": tmp_path}, "run", str(pair["root"] / "b"), tmp_path / "risks.json")
    assert row["eval/r_llh"] == pytest.approx(direct["r_llh"], abs=1e-5)
    assert row["eval/r_cvg"] == pytest.approx(direct["r_cvg"], abs=1e-5)
    assert "top_k: 30" in (run_dir / "config.yaml").read_text()  # the sampling settings are in the resolved config

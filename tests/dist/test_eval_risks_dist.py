"""`distill eval`'s risks do not depend on the process layout: tp=2, and dp=2 (prompts split, sums all-reduced),
give the one-process figures (the same draws; scores to float rounding), the teacher read from a TP checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import run_distributed
from tests.modelmaker import VOCAB, make_hf_model
from tests.shardmaker import make_token_shards

SETTINGS = dict(prompts=5, prompt_len=6, seed=2)


def _measure(student: Path, teacher: Path, tokens: Path, tp: int) -> dict | None:
    from pipeline.config import RiskSamplingConfig
    from pipeline.eval.runner import evaluate_pair

    return evaluate_pair(student=str(student), teacher=str(teacher), tokens=str(tokens), tp=tp, backend="gloo",
                         sampling=RiskSamplingConfig(max_new_tokens=10), **SETTINGS)


def _layouts(rank: int, world: int, root: Path) -> list:
    """tp=2 (teacher from its tp=2 checkpoint), then dp=2 at tp=1; rank 0's figures."""
    return [_measure(root / "a", root / "b_tp2", root / "heldout", tp=2),
            _measure(root / "a", root / "b", root / "heldout", tp=1)]


def test_risks_are_the_same_at_tp2_and_dp2(tmp_path):
    from pipeline.model.tp_checkpoint import hf_to_tp_checkpoint

    make_token_shards(tmp_path / "heldout", [2, 3], seq_len=16, vocab_size=VOCAB)
    make_hf_model("llama_gqa", tmp_path / "a", seed=0)
    make_hf_model("qwen2", tmp_path / "b", seed=1)
    hf_to_tp_checkpoint(tmp_path / "b", tmp_path / "b_tp2", 2)
    single = _measure(tmp_path / "a", tmp_path / "b", tmp_path / "heldout", tp=1)
    tp2, dp2 = run_distributed(_layouts, 2, tmp_path)[0]
    for other in (tp2, dp2):
        assert (other["llh_tokens"], other["cvg_tokens"]) == (single["llh_tokens"], single["cvg_tokens"])
        assert other["r_llh"] == pytest.approx(single["r_llh"], abs=1e-5)
        assert other["r_cvg"] == pytest.approx(single["r_cvg"], abs=1e-5)

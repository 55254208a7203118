"""f-DISTILL's KL on teacher-sampled prefixes, on a Markov language with a teacher at its entropy rate.

The teacher is built, not trained (`tests/languagemaker.markov_teacher`): a Llama whose next-token
distribution is the chain's transition row. The real cache job samples its continuations of 4-token
prompts of the training shards (top-k 30 covers every state's 5-20 successors and EOS, so these are
samples of the language itself) and caches its top-16 targets along them. Two students of the same size,
seed and budget: CE on the corpus labels, and forward KL on the teacher-sampled sequences (only the
generated positions count, by the shards' loss mask). Then `distill eval` measures both risks on
held-out prompts, and the test recomputes them independently: coverage risk with `transformers` on the
exported student over the teacher's samples, likelihood risk straight from the transition matrix over
the student's samples.

Why the ordering does not flake: everything is seeded; the KL student sees a whole next-token
distribution at each of its positions where the CE student sees one draw; the coverage risk is the
student's cross-entropy on the language's own samples. Measured over student seeds 1-3: R_cvg 2.499-2.507
for KL against 3.572-3.597 for CE (asked: KL below 0.9 × CE; measured 0.70), R_llh 3.74-3.87 against
7.22-7.69.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.languagemaker import MarkovLanguage, make_language_shards, markov_teacher
from tests.trainkit import STUDENT, student_overrides, train_config

SEQ_LEN = 32
PROMPT = 4
RUN = dict(steps=60, micro_batch=8, optim__lr=0.01, optim__warmup_steps=5)
RISK_PROMPTS = 48
SEED = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.config import CacheConfig, from_dict
    from pipeline.teacher.job import run_cache
    from pipeline.train.export import export_checkpoint
    from pipeline.train.run import run_training

    root = tmp_path_factory.mktemp("fdistill")
    language = MarkovLanguage(300, seed=0)
    make_language_shards(root / "train", language, [240, 240], seq_len=SEQ_LEN, seed=1)
    make_language_shards(root / "heldout", language, [RISK_PROMPTS], seq_len=SEQ_LEN, seed=2, prefix="held")
    markov_teacher(language, root / "teacher")
    run_cache(from_dict(CacheConfig, {
        "teacher": str(root / "teacher"), "tokens": str(root / "train"), "output": str(root / "cache"),
        "progress": False, "micro_batch": 16, "compute": {"vocab_multiple": 64},
        "targets": {"mode": "topk", "k": 16},
        "prefixes": {"source": "teacher", "prompt_len": PROMPT, "sampling": {"top_k": 30, "max_new_tokens": 64}}}))
    students = {}
    for name, tokens, cache in (("ce", root / "train", None), ("kl", root / "cache" / "generated", root / "cache")):
        run_dir = root / name
        overrides = student_overrides(run_dir, tokens, cache, **RUN) + ["log.tensorboard=false", f"seed={SEED}"]
        assert run_training(train_config(overrides)) == 0
        export_checkpoint(run_dir, root / f"{name}_hf", progress=False)
        students[name] = root / f"{name}_hf"
    return root, language, students


def _prompts(root: Path) -> tuple[list[torch.Tensor], list[str]]:
    from pipeline.data.dataset import TokenShardDataset

    data = TokenShardDataset(str(root / "heldout"), micro_batch=RISK_PROMPTS, dp_rank=0, dp_size=1, seed=0,
                             shuffle=False)
    batch = data.batch(0)
    return [row[:PROMPT] for row in batch["tokens"]], batch["keys"]



def _distill_eval(root: Path, student: Path, out: Path) -> dict:
    from pipeline.cli import main

    assert main(["eval", "--student", str(student), "--teacher", str(root / "teacher"), "--tokens",
                 str(root / "heldout"), "--prompts", str(RISK_PROMPTS), "--prompt-len", str(PROMPT),
                 "--max-new-tokens", str(SEQ_LEN - PROMPT), "--seed", "5", "--vocab-multiple", "64",
                 "--output", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def measured(setup):
    root, _, students = setup
    return {name: _distill_eval(root, folder, root / f"risks_{name}.json") for name, folder in students.items()}


def test_kl_on_teacher_samples_covers_the_teacher_better_than_ce(measured):
    kl, ce = measured["kl"], measured["ce"]
    assert kl["r_cvg"] < 0.9 * ce["r_cvg"], (kl, ce)


def test_distill_eval_risks_equal_a_direct_computation(setup, measured):
    """R_cvg: the exported KL student (transformers) over the teacher's samples; R_llh: −log T of the chain
    over the student's samples. The samples are drawn as `distill eval` draws them (same seed and keys)."""
    import transformers

    from pipeline.config import SamplingConfig
    from pipeline.generate import generate
    from pipeline.model import load_hf
    from pipeline.parallel import ParallelContext

    root, language, students = setup
    prompts, keys = _prompts(root)
    sampling = SamplingConfig(top_k=30, max_new_tokens=SEQ_LEN - PROMPT)
    common = dict(vocab_size=300, eos_id=language.eos_id, seed=5)
    with ParallelContext.from_env() as ctx:
        teacher_rows = generate(load_hf(root / "teacher", ctx), prompts, keys, sampling, **common).tokens
        student_rows = generate(load_hf(students["kl"], ctx), prompts, keys, sampling, **common).tokens
    student = transformers.AutoModelForCausalLM.from_pretrained(students["kl"]).eval()
    nll = []
    with torch.no_grad():
        for prompt, row in zip(prompts, teacher_rows):
            sequence = torch.cat([prompt, row])[None]
            logp = student(input_ids=sequence).logits[0].double().log_softmax(-1)
            nll += [-float(logp[PROMPT - 1 + i, int(token)]) for i, token in enumerate(row)]
    log_t = np.log(np.maximum(language.transitions, 1e-9))
    llh = [-log_t[int(torch.cat([p, r])[PROMPT - 1 + i]), int(token)]
           for p, r in zip(prompts, student_rows) for i, token in enumerate(r)]
    kl = measured["kl"]
    assert kl["cvg_tokens"] == len(nll) and kl["llh_tokens"] == len(llh)
    assert math.isclose(kl["r_cvg"], float(np.mean(nll)), rel_tol=1e-5)
    assert math.isclose(kl["r_llh"], float(np.mean(llh)), rel_tol=1e-4)

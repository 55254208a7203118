"""`distill generate` across processes: under torchrun at --tp 2, and from a DeepSpeed training run.

- torchrun --nproc-per-node 2 with --tp 2 writes, from rank 0 only, the same JSONL (top-k sampling)
  as one process at --tp 1: the draws are seeded by (seed, key), not by the layout.
- A training run folder (a ZeRO-3 checkpoint with run.json, as the trainer saves it) generates the same
  greedy tokens as `transformers`' generate on the model the engine held, saved beside it with
  save_hf, and finds the run's tokenizer by itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli import main
from tests.harness import run_distributed
from tests.modelmaker import VOCAB, make_hf_model
from tests.shardmaker import make_token_shards
from tokenization.tokenizer import load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
MODEL = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
         "num_kv_heads": 2}
DS_CONFIG = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 10**9}


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.dist
def test_torchrun_tp2_writes_what_tp1_writes(tmp_path):
    folder = tmp_path / "llama"
    make_hf_model("llama_gqa", folder)
    make_token_shards(tmp_path / "shards", [3, 2], seq_len=8, vocab_size=VOCAB)
    args = [str(folder), "--tokens", str(tmp_path / "shards"), "--prompt-len", "6", "--max-new-tokens", "8",
            "--top-k", "30", "--temperature", "0.8", "--seed", "11", "--batch", "2", "--no-progress"]
    assert main(["generate", *args, "--output", str(tmp_path / "tp1.jsonl")]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "pipeline", "generate",
                           *args, "--tp", "2", "--output", str(tmp_path / "tp2.jsonl")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote 5 samples") == 1  # rank 0 alone reports
    tp1, tp2 = _jsonl(tmp_path / "tp1.jsonl"), _jsonl(tmp_path / "tp2.jsonl")
    assert len(tp1) == 5 and tp2 == tp1


def _save_run(rank: int, world: int, root: str, tokenizer: str) -> None:
    from pipeline.config import ComputeConfig, ModelConfig, TrainConfig, config_to_dict, from_dict
    from pipeline.model import save_hf
    from pipeline.model.builder import LlamaGPT
    from pipeline.parallel import ParallelContext
    from pipeline.train.engine import import_deepspeed

    model_cfg = ModelConfig(**MODEL, init_std=0.2)  # large weights: the greedy path depends on the model
    with ParallelContext.from_env(tp=1) as ctx:
        deepspeed = import_deepspeed(ctx)
        with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG, mpu=ctx, data_parallel_group=ctx.dp_group):
            model = LlamaGPT(model_cfg, ComputeConfig(), ctx, seed=3)
        engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG, mpu=ctx, dist_init_required=False)
        checkpoints = Path(root) / "run" / "checkpoints"
        engine.save_checkpoint(str(checkpoints), tag="step_00000000")
        cfg = from_dict(TrainConfig, {"model": config_to_dict(model_cfg), "run_dir": str(Path(root) / "run"),
                                      "data": {"tokenizer": tokenizer}})
        run = {"config": config_to_dict(cfg), "layout": {"world": 1, "tp": 1, "dp": 1}, "step": 0}
        (checkpoints / "step_00000000" / "run.json").write_text(json.dumps(run))
        save_hf(engine.module, Path(root) / "reference_hf", ctx)
        engine.destroy()


@pytest.mark.dist
def test_a_training_run_generates_like_its_model(tmp_path):
    import transformers

    (tmp_path / "corpus.txt").write_text("a single man in possession of a good fortune must be in want of a wife\n" * 4)
    tok_path = tmp_path / "tok.json"
    train_tokenizer([tmp_path / "corpus.txt"], 270, out_path=tok_path)
    run_distributed(_save_run, 1, str(tmp_path), str(tok_path))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a single man\nin want of a\n")
    out = tmp_path / "run.jsonl"
    assert main(["generate", str(tmp_path / "run"), "--prompts", str(prompts), "--greedy", "--max-new-tokens", "10",
                 "--eos-id", "5", "--output", str(out), "--no-progress"]) == 0
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "reference_hf", dtype=torch.float32).eval()
    tok = load_tokenizer(tok_path)
    for row in _jsonl(out):
        assert row["prompt_ids"] == tok.encode(row["prompt"]).ids
        ids = torch.tensor([row["prompt_ids"]])
        with torch.no_grad():
            expected = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                                          eos_token_id=5, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert row["completion_ids"] == expected, row["key"]

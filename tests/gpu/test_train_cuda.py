"""The trainer on CUDA: nccl, bf16 through DeepSpeed, a checkpoint and its export; skipped without a GPU.

The same command as on CPU with nothing but the device changed (compute.dtype auto = bfloat16,
parallel.backend auto = nccl): the run must finish, keep its losses finite, write a DeepSpeed config
with bf16 on, and export a checkpoint whose fp32 master weights transformers loads.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tests.shardmaker import make_token_shards
from tests.trainkit import losses, student_overrides, teacher_cache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_nccl_run_trains_checkpoints_and_exports(tmp_path):
    tokens = tmp_path / "tokens"
    make_token_shards(tokens, [16], seq_len=32, vocab_size=300, seed=0)
    cache = teacher_cache(tmp_path, tokens)
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "pipeline", "train",
                             *student_overrides(run, tokens, cache, steps=4, checkpoint__every=2)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run / "deepspeed.json").read_text())["bf16"]["enabled"] is True
    assert all(math.isfinite(v) for v in losses(run).values()) and len(losses(run)) == 4
    import transformers

    from pipeline.train.export import export_checkpoint

    export_checkpoint(run, tmp_path / "hf", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert torch.isfinite(model(torch.arange(8)[None]).logits).all()

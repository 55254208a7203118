"""The model on CUDA: bf16 forward against transformers, and flash-attn against SDPA; skipped without a GPU.

The flash-attn cases also need the package (`pip install '.[gpu]'`) and skip without it, saying so.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from pipeline.config import ComputeConfig
from pipeline.model import document_ids_from_segments, load_hf
from pipeline.parallel import ParallelContext
from tests.modelmaker import make_hf_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_flash = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
BF16_TOLERANCE = 5e-2  # bf16 keeps 8 mantissa bits: logits of magnitude ~1 differ by a few 1e-2 across kernels


@pytest.fixture
def cuda_context():
    ctx = ParallelContext.from_env(tp=1, backend="nccl")
    yield ctx
    ctx.destroy()


def _logits(path, ctx, tokens, **compute):
    model = load_hf(path, ctx, ComputeConfig(dtype="bfloat16", **compute)).eval()
    with torch.no_grad():
        return model(tokens.cuda()).float()


def test_bf16_sdpa_matches_transformers(tmp_path, cuda_context):
    path, reference = tmp_path, make_hf_model("llama_gqa", tmp_path)
    tokens = torch.randint(0, reference.config.vocab_size, (2, 64))
    with torch.no_grad():
        expected = reference.to("cuda", torch.bfloat16)(tokens.cuda()).logits.float()
    got = _logits(path, cuda_context, tokens, attention="sdpa")[..., :reference.config.vocab_size]
    torch.testing.assert_close(got, expected, atol=BF16_TOLERANCE, rtol=BF16_TOLERANCE)


@needs_flash
@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "mistral"])
def test_flash_matches_sdpa(tmp_path, cuda_context, kind):
    path, reference = tmp_path, make_hf_model(kind, tmp_path)
    tokens = torch.randint(0, reference.config.vocab_size, (2, 64))
    flash = _logits(path, cuda_context, tokens, attention="flash")
    sdpa = _logits(path, cuda_context, tokens, attention="sdpa")
    torch.testing.assert_close(flash, sdpa, atol=BF16_TOLERANCE, rtol=BF16_TOLERANCE)


@needs_flash
def test_flash_document_masking_matches_sdpa(tmp_path, cuda_context):
    path, reference = tmp_path, make_hf_model("llama_gqa", tmp_path)
    tokens = torch.randint(0, reference.config.vocab_size, (2, 64)).cuda()
    segments = torch.tensor([[0, 10, 40, 65], [0, 65, -1, -1]]).cuda()
    results = {}
    for attention in ("flash", "sdpa"):
        model = load_hf(path, cuda_context, ComputeConfig(dtype="bfloat16", attention=attention,
                                                          document_masking=True)).eval()
        with torch.no_grad():
            results[attention] = model(tokens, model.document_ids(segments, 64)).float()
    torch.testing.assert_close(results["flash"], results["sdpa"], atol=BF16_TOLERANCE, rtol=BF16_TOLERANCE)
    assert document_ids_from_segments(segments, 64)[0, 10] == 1

"""Rotary frequencies, document positions and attention masks of pipeline/model, on hand examples.

inverse_frequencies is compared with transformers' own rope initialisation (the inv_freq buffer of a
built LlamaForCausalLM, and ROPE_INIT_FUNCTIONS) for default, linear and llama3 parameters chosen
so that llama3's three wavelength regimes all occur; document ids, restarting positions and the
allowed (query, key) pairs are checked against matrices written out by hand.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, ModelConfig
from pipeline.model import document_ids_from_segments
from pipeline.model.attention import allowed_pairs, resolve_backend
from pipeline.model.builder import document_positions
from pipeline.model.rotary import RotaryEmbedding, inverse_frequencies

BASE = dict(vocab_size=50, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=2)  # head_dim 32
# original 32 with low/high factors 1/4: wavelengths above 32 are scaled, below 8 kept, between blended
ROPES = {
    "default": (dict(rope_type="default", rope_theta=10000.0), dict(rope_theta=10000.0)),
    "linear": (dict(rope_type="linear", rope_theta=500.0, factor=4.0),
               dict(rope_theta=500.0, rope_scaling="linear", rope_factor=4.0)),
    "llama3": (dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=32),
               dict(rope_theta=10000.0, rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_positions=32)),
}


def _hf_inv_freq(rope_parameters: dict) -> tuple[torch.Tensor, object]:
    import transformers

    config = transformers.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, rope_parameters=rope_parameters)
    model = transformers.LlamaForCausalLM(config)
    return model.model.rotary_emb.inv_freq.float(), config


@pytest.mark.parametrize("kind", list(ROPES))
def test_inverse_frequencies_equal_transformers(kind):
    hf_params, ours = ROPES[kind]
    expected, config = _hf_inv_freq(hf_params)
    actual = inverse_frequencies(ModelConfig(**BASE, **ours))
    assert actual.dtype == torch.float32 and actual.shape == (16,)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=0)
    if kind != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        again, _ = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))
        torch.testing.assert_close(actual, again.float(), rtol=1e-6, atol=0)


def test_llama3_scaling_touches_some_frequencies_only():
    plain = inverse_frequencies(ModelConfig(**BASE, rope_theta=10000.0))
    scaled = inverse_frequencies(ModelConfig(**BASE, **ROPES["llama3"][1]))
    kept = torch.isclose(scaled, plain, rtol=1e-6, atol=0)
    divided = torch.isclose(scaled, plain / 8, rtol=1e-6, atol=0)
    blended = ~kept & ~divided
    assert kept.any() and divided.any() and blended.any(), (kept, divided)
    assert kept[0] and divided[-1]  # highest frequency kept, lowest divided by the factor


def test_document_ids_and_positions_by_hand():
    segments = torch.tensor([[0, 3, 5, -1], [0, -1, -1, -1], [0, 1, 2, 3]])
    ids = document_ids_from_segments(segments, 6)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 3, 3]]
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2]]


def test_rotary_angles_follow_given_positions():
    cfg = ModelConfig(**BASE)
    rotary = RotaryEmbedding(cfg)
    inv = inverse_frequencies(cfg)
    shared = rotary(4)
    assert shared.shape == (4, 1, 1, 32)
    torch.testing.assert_close(shared[:, 0, 0, :16], torch.arange(4.0)[:, None] * inv)
    torch.testing.assert_close(shared[..., :16], shared[..., 16:])
    rotary.set_positions(torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]))
    per_sample = rotary(4)
    assert per_sample.shape == (4, 2, 1, 32)
    torch.testing.assert_close(per_sample[:, 0, 0, :16], torch.tensor([0.0, 1, 0, 1])[:, None] * inv)
    torch.testing.assert_close(per_sample[:, 1], shared[:, 0])


def test_allowed_pairs_by_hand():
    causal = allowed_pairs(None, 4, None, "cpu")
    assert causal.shape == (1, 1, 4, 4)
    assert torch.equal(causal[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())

    windowed = allowed_pairs(None, 4, 2, "cpu")[0, 0].int().tolist()
    assert windowed == [[1, 0, 0, 0],
                        [1, 1, 0, 0],
                        [0, 1, 1, 0],
                        [0, 0, 1, 1]]

    docs = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    both = allowed_pairs(docs, 5, 2, "cpu")
    assert both.shape == (2, 1, 5, 5)
    assert both[0, 0].int().tolist() == [[1, 0, 0, 0, 0],
                                         [1, 1, 0, 0, 0],
                                         [0, 0, 1, 0, 0],
                                         [0, 0, 1, 1, 0],
                                         [0, 0, 0, 1, 1]]
    assert torch.equal(both[1, 0], allowed_pairs(None, 5, 2, "cpu")[0, 0])
    docs_only = allowed_pairs(docs, 5, None, "cpu")[0, 0].int().tolist()
    assert docs_only[4] == [0, 0, 1, 1, 1] and docs_only[1] == [1, 1, 0, 0, 0]


def test_resolve_backend_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_backend("sdpa", cpu, torch.float32) == "sdpa"
    assert resolve_backend("auto", cpu, torch.float32) == "sdpa"
    with pytest.raises(ConfigError, match="flash needs CUDA"):
        resolve_backend("flash", cpu, torch.bfloat16)

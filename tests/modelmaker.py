"""Tiny random Hugging Face models of the supported families, built from configs and saved locally.

Shared by the model tests: `make_hf_model(kind, folder)` builds one of the `KINDS` below with random
weights of std 0.2 (so attention and the MLP do real work; the default init makes logits near
uniform), saves it with `save_pretrained` and returns the model in eval mode for reference logits.
Nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300   # not a multiple of 128: the padded vocabulary rows are exercised
SEQ = 24
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)

# name -> (family, config overrides)
KINDS = {
    "llama_gqa": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "llama_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral": ("mistral", dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=6)),
    "llama_kv4": ("llama", dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)),
}


def hf_config(kind: str):
    import transformers

    family, overrides = KINDS[kind]
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[family]
    config = cls(**{**BASE, **overrides})
    if family == "qwen2":
        config.use_sliding_window = False
    return config


def make_hf_model(kind: str, folder: str | Path | None = None, *, seed: int = 0, std: float = 0.2, **save_kwargs):
    """A random `kind` model (fp32, eval mode); saved to `folder` with save_pretrained when given."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(kind)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, std)
    if folder is not None:
        model.save_pretrained(folder, **save_kwargs)
    return model


def random_tokens(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits.float()


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder (single file or sharded) by name."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors

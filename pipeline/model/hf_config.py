"""Translation between a Hugging Face `config.json` and `ModelConfig`, for the families we support.

Reading goes through `transformers`' own config classes, so legacy fields (`rope_theta` and
`rope_scaling` at the top level, a missing `head_dim` or `tie_word_embeddings`) get exactly the
defaults `from_pretrained` would give them; anything the megatron-core model here would compute
differently (another activation, biases we do not carry, an unknown rope type) is refused by name
instead of being silently ignored. Writing builds the same config class, so the exported folder
carries `architectures`, `model_type` and the rope parameters in the form the installed
`transformers` expects.

Design choice: a closed list of families (Llama, Qwen2, Mistral) checked field by field; the cost is
that a new family is a code change, which is the point: an unchecked import is a wrong teacher.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import ModelConfig
from pipeline.model.checkpoint_files import CheckpointError

HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
FAMILY_OF_CLASS = {name: family for family, name in HF_CLASS.items()}


def _config_class(family: str):
    import transformers
    return {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
            "mistral": transformers.MistralConfig}[family]


def read_config_json(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def family_of(raw: dict[str, Any], where: str) -> str:
    """The supported family a config.json describes, or an error naming what it is."""
    classes = raw.get("architectures") or []
    for name in classes:
        if name in FAMILY_OF_CLASS:
            return FAMILY_OF_CLASS[name]
    model_type = raw.get("model_type")
    if not classes and model_type in HF_CLASS:
        return model_type
    shown = ", ".join(classes) if classes else f"model_type={model_type!r}"
    raise CheckpointError(f"{where}: unsupported architecture {shown}; supported: {', '.join(HF_CLASS.values())}")


def model_config_from_hf(folder: str | Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder's config.json; CheckpointError naming the field if unsupported."""
    where = str(Path(folder) / "config.json")
    raw = read_config_json(folder)
    family = family_of(raw, where)
    hf = _config_class(family)(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    _refuse_unsupported(hf, family, where)
    rope = _rope_fields(hf, where)
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        architecture=family, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads, head_dim=head_dim,
        norm_eps=hf.rms_norm_eps, tie_embeddings=bool(hf.tie_word_embeddings), qkv_bias=family == "qwen2",
        sliding_window=_sliding_window(hf, family), max_position_embeddings=hf.max_position_embeddings,
        init_std=getattr(hf, "initializer_range", 0.02), **rope)


def _refuse_unsupported(hf, family: str, where: str) -> None:
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act={act!r} is not supported (SwiGLU with silu only)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf, flag, False):
            raise CheckpointError(f"{where}: {flag}=true is not supported ({family} without extra biases only)")
    if family == "qwen2" and getattr(hf, "use_sliding_window", False):
        raise CheckpointError(f"{where}: use_sliding_window=true is not supported for qwen2 (its per-layer "
                              f"windows differ from Mistral's)")


def _rope_fields(hf, where: str) -> dict[str, Any]:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if not params:  # transformers before 5 keeps theta and scaling apart
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    fields = {"rope_theta": float(params.get("rope_theta", 10000.0))}
    if kind == "default":
        return {**fields, "rope_scaling": "none"}
    if kind == "linear":
        return {**fields, "rope_scaling": "linear", "rope_factor": float(params["factor"])}
    if kind == "llama3":
        return {**fields, "rope_scaling": "llama3", "rope_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                "rope_original_max_positions": int(params["original_max_position_embeddings"])}
    raise CheckpointError(f"{where}: rope type {kind!r} is not supported (default, linear, llama3)")


def _sliding_window(hf, family: str) -> Optional[int]:
    if family != "mistral":
        return None
    window = getattr(hf, "sliding_window", None)
    return int(window) if window else None


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype, *, bos_id: Optional[int] = None,
                   eos_id: Optional[int] = None) -> dict[str, Any]:
    """config.json content for `cfg`, built by the installed transformers' own config class."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_positions)
    kwargs = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size, hidden_act="silu",
                  max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
                  initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope,
                  bos_token_id=bos_id, eos_token_id=eos_id)
    if cfg.architecture == "mistral":
        kwargs["sliding_window"] = cfg.sliding_window
    hf = _config_class(cfg.architecture)(**kwargs)
    hf.architectures = [HF_CLASS[cfg.architecture]]
    hf.dtype = dtype
    return hf.to_dict()

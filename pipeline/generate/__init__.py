"""Generation: incremental decoding with a KV cache and sampling from vocabulary-parallel logits.

Used by `distill generate`, the teacher-sampled cache job and the risks of eval. Names resolve lazily,
so importing this package does not load torch.
"""
from importlib import import_module

_WHERE = {"Decoder": "decode", "Generation": "decode", "generate": "decode", "draw_uniforms": "decode",
          "LogitsObserver": "decode", "for_generation": "decode", "KVCache": "kv_cache", "next_tokens": "sampling",
          "greedy": "sampling"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.generate' has no attribute {name!r}")
    return getattr(import_module(f"pipeline.generate.{_WHERE[name]}"), name)

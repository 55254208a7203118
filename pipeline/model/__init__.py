"""Llama-family models on megatron-core with tensor parallelism, and Hugging Face import/export.

Names resolve lazily, so importing `pipeline.model.errors` (as the CLI does) does not load torch.
"""
from importlib import import_module

_WHERE = {"LlamaGPT": "builder", "build_model": "builder", "document_ids_from_segments": "builder",
          "load_hf": "hf_io", "save_hf": "hf_io", "load_model": "tp_checkpoint",
          "CheckpointError": "errors", "ModelLayoutError": "errors"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.model' has no attribute {name!r}")
    return getattr(import_module(f"pipeline.model.{_WHERE[name]}"), name)

"""Llama-family models on megatron-core with tensor parallelism, and Hugging Face import/export."""
from pipeline.model.builder import LlamaGPT, build_model, document_ids_from_segments
from pipeline.model.checkpoint_files import CheckpointError
from pipeline.model.hf_io import load_hf, save_hf

__all__ = ["CheckpointError", "LlamaGPT", "build_model", "document_ids_from_segments", "load_hf", "save_hf"]

"""Evaluation measures beyond the trainer's perplexity: the risks of f-DISTILL's Table 3.

Used by the trainer's eval (`pipeline/train/evaluate.py`) and by `distill eval`. Names resolve lazily,
so importing this package does not load torch.
"""
from importlib import import_module

_WHERE = {"check_vocabularies": "risks", "heldout_prompts": "risks", "risks": "risks", "sample": "risks",
          "score_continuations": "risks", "RiskError": "errors"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.eval' has no attribute {name!r}")
    return getattr(import_module(f"pipeline.eval.{_WHERE[name]}"), name)

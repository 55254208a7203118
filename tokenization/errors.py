"""The one error type of the tokenization stage, so the CLI can report it without a traceback.

Design choice: a single `TokenizationError` (a ValueError) for bad input, bad tokenizers and bad
settings, with the message naming the file, line or field; the cost is that callers who want to tell
kinds apart must read the message.
"""
from __future__ import annotations


class TokenizationError(ValueError):
    """Bad input text, tokenizer or shard settings; the message names the file, line or field."""

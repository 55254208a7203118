"""Train, load and identify the tokenizer that token shards are made with.

Design choice: byte-level BPE through Hugging Face `tokenizers` (lossless on any UTF-8 text, so a
decode gives the original documents back), saved as one `tokenizer.json`; the tokenizer's identity is
the sha256 of its serialised JSON, so two files with the same content are the same tokenizer. The cost:
a semantically equal tokenizer serialised differently (another library version) gets another fingerprint.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenization.errors import TokenizationError

DEFAULT_EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(files: Sequence[str | Path], vocab_size: int, special_tokens: Sequence[str] = (DEFAULT_EOS,),
                    out_path: str | Path = TOKENIZER_FILE, *, text_field: str = "text",
                    txt_mode: str = "file") -> Tokenizer:
    """Train a byte-level BPE tokenizer on the documents of `files` and save it as `out_path`."""
    from tokenization.readers import iter_documents  # readers import nothing from here; keeps the module light

    if vocab_size < 256 + len(special_tokens):
        raise TokenizationError(f"vocab_size: expected ≥ {256 + len(special_tokens)} (256 bytes + special tokens), "
                                f"got {vocab_size}")
    if not files:
        raise TokenizationError("train_tokenizer: no input files")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def documents() -> Iterable[str]:
        for path in files:
            yield from iter_documents(path, text_field=text_field, txt_mode=txt_mode)

    tok.train_from_iterator(documents(), trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a `tokenizer.json` file or a Hugging Face tokenizer folder holding one."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"{path} is a folder without {TOKENIZER_FILE}" if path.is_dir() else f"{path} does not exist"
        raise TokenizationError(f"tokenizer: {where}; expected a tokenizer.json file or a folder holding one")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises its own Exception type for every parse problem
        raise TokenizationError(f"tokenizer: {file} is not a valid tokenizer.json ({err})") from None


def fingerprint(tok: Tokenizer) -> str:
    """sha256 (hex) of the tokenizer's serialised JSON."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def vocab_size(tok: Tokenizer) -> int:
    """Number of ids the tokenizer can emit (added tokens included): one past the largest id."""
    return max(tok.get_vocab_size(with_added_tokens=True), max(tok.get_vocab(with_added_tokens=True).values()) + 1)


def eos_id(tok: Tokenizer, token: str = DEFAULT_EOS) -> int:
    """The id of the end-of-document token; a clear error when the tokenizer lacks it."""
    found = tok.token_to_id(token)
    if found is None:
        raise TokenizationError(f"tokenizer has no token {token!r} to end documents with; "
                                f"train it with that special token or choose another with --eos-token")
    return found

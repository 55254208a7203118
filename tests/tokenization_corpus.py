"""Generated text corpora and shard reading shared by the tokenization tests (no downloads)."""
from __future__ import annotations

import gzip
import io
import random
import tarfile
from pathlib import Path

import numpy as np

from tokenization import format as fmt

_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ré", "ü", "zh", "qu", "x", "été", "日本", "😀"]


def make_documents(count: int, seed: int = 0, words: tuple[int, int] = (3, 60)) -> list[str]:
    """Random multi-line documents with non-ASCII text and punctuation, never empty, no blank lines."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    docs = []
    for _ in range(count):
        n = rng.randint(*words)
        text = " ".join(rng.choice(vocab) for _ in range(n))
        docs.append(text.replace(" ka ", ",\n  ka ").replace(" lo ", ". lo "))
    return docs


def write_blocks(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_members(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A gzip-compressed tar of exactly these (name, bytes) members, in order: damage the writer never makes."""
    with gzip.open(path, "wb") as stream, tarfile.open(fileobj=stream, mode="w|") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def read_shard_folder(folder: Path) -> tuple[fmt.Manifest, list[tuple[str, np.ndarray, np.ndarray]]]:
    """(manifest, [(key, tokens, segments)]) read back through webdataset in manifest order."""
    import webdataset as wds

    manifest = fmt.read_manifest(folder)
    samples = []
    for entry in manifest.shards:
        for sample in wds.WebDataset(str(folder / entry.name), shardshuffle=False):
            tokens, segments = fmt.decode_sample(sample, seq_len=manifest.seq_len, dtype=manifest.dtype,
                                                 where=entry.name)
            samples.append((sample["__key__"], tokens, segments))
    return manifest, samples

"""The real shard writer feeding the real streaming reader: documents in, the same documents out.

`distill tokenize shard` (the command a user runs) writes the shards; TokenShardDataset reads them for
two data-parallel ranks through a DataLoader with workers; decoding every sample and splitting on EOS
gives back the corpus's documents, each once, and the ranks see disjoint samples.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import ResumableLoader, TokenShardDataset
from tests.tokenization_corpus import make_documents, write_blocks
from tokenization.tokenizer import eos_id, load_tokenizer

SEQ_LEN = 512  # longer than any generated document, so bestfit never splits one


def distill(*args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    docs = [make_documents(120, seed=s) for s in range(3)]
    for i, part in enumerate(docs):
        write_blocks(root / f"part{i}.txt", part)
    distill("tokenize", "train-tokenizer", "--input", str(root / "part*.txt"), "--vocab-size", "400",
            "--txt-mode", "blocks", "--out", str(root / "tokenizer.json"), cwd=root)
    distill("tokenize", "shard", "--input", str(root / "part*.txt"), "--tokenizer", str(root / "tokenizer.json"),
            "--out", str(root / "shards"), "--seq-len", str(SEQ_LEN), "--packing", "bestfit", "--txt-mode", "blocks",
            "--workers", "2", "--shard-max-samples", "5", "--no-progress", cwd=root)
    return root, [d for part in docs for d in part]


def read_rank(folder: Path, dp_rank: int, dp_size: int) -> list[tuple[str, list[int]]]:
    dataset = TokenShardDataset(str(folder), micro_batch=4, dp_rank=dp_rank, dp_size=dp_size, seed=3, max_epochs=1)
    samples = []
    for batch in ResumableLoader(dataset, num_workers=2):
        for key, tokens, segments in zip(batch["keys"], batch["tokens"], batch["segments"]):
            end = int(segments[segments >= 0][-1])
            samples.append((key, tokens[:end].tolist()))
    return samples


def test_documents_survive_tokenize_shard_and_stream(shard_folder):
    root, documents = shard_folder
    tok = load_tokenizer(root / "tokenizer.json")
    eos = eos_id(tok)
    ranks = [read_rank(root / "shards", r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0, "every DP rank gets the same number of samples"
    keys = [key for rank in ranks for key, _ in rank]
    assert len(keys) == len(set(keys)), "DP ranks must see disjoint samples"
    pieces = [tokens for rank in ranks for _, tokens in rank]
    decoded = {tok.decode(doc_ids) for tokens in pieces for doc_ids in split_on(tokens, eos) if doc_ids}
    assert decoded <= set(documents), "every decoded document must be one of the corpus's"
    # an epoch drops at most dp·micro_batch − 1 = 7 samples, each holding a few documents
    assert len(decoded) >= 0.8 * len(set(documents)), f"{len(decoded)} of {len(set(documents))} came back"


def split_on(tokens: list[int], eos: int) -> list[list[int]]:
    docs, current = [], []
    for token in tokens:
        if token == eos:
            docs.append(current)
            current = []
        else:
            current.append(token)
    return docs + [current]

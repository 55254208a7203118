"""Tokenize generated text into shards and read them back: concat, bestfit, and a vocabulary above 65536."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from tests.tokenization_corpus import make_documents, read_shard_folder, write_blocks
from tokenization import format as fmt
from tokenization.errors import TokenizationError
from tokenization.shards import shard_corpus
from tokenization.tokenizer import eos_id, fingerprint, load_tokenizer, train_tokenizer

SEQ_LEN = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = [make_documents(60, seed=s) for s in range(3)]
    write_blocks(root / "a.txt", docs[0])
    write_blocks(root / "b.txt", docs[1])
    with open(root / "c.jsonl", "w", encoding="utf-8") as f:
        for d in docs[2]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    tok_path = root / "tokenizer.json"
    train_tokenizer([root / "a.txt", root / "b.txt"], 600, out_path=tok_path, txt_mode="blocks")
    return root, docs, tok_path


def _shard(corpus, out, packing, **kw):
    root, _, tok_path = corpus
    return shard_corpus([str(root / "[ab].txt"), str(root / "c.jsonl")], tok_path, out, seq_len=SEQ_LEN,
                        packing=packing, txt_mode="blocks", shard_max_samples=7, progress=False, **kw)


def _by_file(samples):
    files: dict[int, list] = {}
    for key, tokens, segments in samples:
        files.setdefault(int(key.split("-")[0]), []).append((key, tokens, segments))
    return files


def test_trained_tokenizer_is_byte_level_and_identified_by_its_json(corpus):
    _, _, tok_path = corpus
    tok = load_tokenizer(tok_path)
    assert tok.get_vocab_size() == 600 and eos_id(tok) == 0
    assert fingerprint(tok) == fingerprint(load_tokenizer(tok_path.parent))  # a folder holding tokenizer.json
    text = "naïve 日本 😀\n\tend"
    assert tok.decode(tok.encode(text).ids) == text
    with pytest.raises(TokenizationError, match="no token '<eos>'"):
        eos_id(tok, "<eos>")


def test_concat_round_trip_gives_back_every_document_inside_the_kept_windows(corpus, tmp_path):
    manifest = _shard(corpus, tmp_path / "out", "concat")
    tok = load_tokenizer(corpus[2])
    assert manifest.packing == "concat" and manifest.eos_id == 0 and manifest.seq_len == SEQ_LEN
    assert manifest.dtype == np.uint16 and manifest.tokenizer_fingerprint == fingerprint(tok)
    read, samples = read_shard_folder(tmp_path / "out")
    assert read == manifest and len(samples) == manifest.total_samples
    assert len({key for key, _, _ in samples}) == len(samples)
    assert all(len(s) <= 7 for s in [range(e.samples) for e in manifest.shards])
    dropped = 0
    for file_index, rows in _by_file(samples).items():
        assert [k for k, _, _ in rows] == [f"{file_index:05d}-{n:09d}" for n in range(len(rows))]
        stream = np.concatenate([t for _, t, _ in rows])
        for _, tokens, segments in rows:
            assert segments[-1] == SEQ_LEN + 1
            assert all(tokens[s - 1] == 0 for s in segments[1:-1])  # every document start follows an EOS
        cuts = np.flatnonzero(stream == 0)
        pieces = np.split(stream[:cuts[-1]], cuts[:-1] + 1)
        decoded = [tok.decode(p[p != 0].tolist(), skip_special_tokens=False) for p in pieces]
        original = corpus[1][file_index]
        assert decoded == original[:len(decoded)] and len(decoded) >= len(original) - 2
        full = sum(len(tok.encode(d).ids) + 1 for d in original)
        dropped += full - len(stream)
    assert manifest.extra["dropped_tokens"] == dropped and manifest.extra["documents"] == 180
    assert manifest.total_tokens == manifest.total_samples * (SEQ_LEN + 1)


def test_bestfit_stores_every_document_exactly_once(corpus, tmp_path):
    manifest = _shard(corpus, tmp_path / "out", "bestfit")
    tok = load_tokenizer(corpus[2])
    _, samples = read_shard_folder(tmp_path / "out")
    window = SEQ_LEN + 1
    for file_index, rows in _by_file(samples).items():
        got = []
        for _, tokens, segments in rows:
            assert np.all(tokens[segments[-1]:] == 0)  # padding is EOS
            got += [tuple(tokens[a:b].tolist()) for a, b in zip(segments[:-1], segments[1:])]
        expected = []
        for doc in corpus[1][file_index]:
            ids = tok.encode(doc).ids + [0]
            expected += [tuple(ids[i:i + window]) for i in range(0, len(ids), window)]
        assert sorted(got) == sorted(expected)
    assert manifest.extra["dropped_tokens"] == 0
    assert manifest.total_tokens == sum(int(s[-1]) for _, _, s in samples)


def _wordlevel_tokenizer(folder, size):
    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(size - 2)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_vocabulary_above_65536_is_stored_as_uint32_and_round_trips(tmp_path):
    tok = _wordlevel_tokenizer(tmp_path / "hf", 70_000)
    rng = random.Random(3)
    docs = [" ".join(f"w{rng.randrange(69_998)}" for _ in range(rng.randint(5, 30))) for _ in range(40)]
    write_blocks(tmp_path / "in.txt", docs)
    manifest = shard_corpus([str(tmp_path / "in.txt")], tmp_path / "hf", tmp_path / "out", seq_len=16,
                            txt_mode="blocks", progress=False)
    assert manifest.vocab_size == 70_000 and manifest.dtype == np.uint32
    _, samples = read_shard_folder(tmp_path / "out")
    stream = np.concatenate([t for _, t, _ in samples])
    assert stream.dtype == np.uint32 and stream.max() >= 65536
    cuts = np.flatnonzero(stream == 0)
    decoded = [tok.decode(p[p != 0].tolist()) for p in np.split(stream[:cuts[-1]], cuts[:-1] + 1)]
    assert decoded == docs[:len(decoded)] and len(decoded) >= len(docs) - 2


def test_token_dtype_switches_at_65536():
    assert fmt.token_dtype(65535) == np.uint16 and fmt.token_dtype(65536) == np.uint32

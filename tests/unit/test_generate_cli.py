"""`distill generate` as a user runs it, in one process: prompts from a text file and from token shards,
printed or written as JSONL, greedy output equal to `transformers`' own `generate`, and bad input that
exits 2 with a message naming what is wrong (and writes nothing).

The model is the tiny random Llama of tests/modelmaker.py (vocabulary 300, EOS id 2 in its config.json)
with a byte-level BPE tokenizer of 280 ids trained here on a few sentences.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.cli import main
from tests.modelmaker import VOCAB, make_hf_model
from tests.shardmaker import make_token_shards
from tokenization.tokenizer import load_tokenizer, train_tokenizer

TEXT = ["It is a truth universally acknowledged, that a single man in possession",
        "of a good fortune, must be in want of a wife. However little known the feelings",
        "or views of such a man may be on his first entering a neighbourhood"]
PROMPTS = ["It is a truth", "", "of a good fortune, must be in want", "   ", "or views"]  # two blank lines


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF folder with tokenizer.json, the transformers model)."""
    root = tmp_path_factory.mktemp("gen")
    folder = root / "llama"
    model = make_hf_model("llama_gqa", folder)
    (root / "corpus.txt").write_text("\n".join(TEXT * 4))
    train_tokenizer([root / "corpus.txt"], 280, out_path=folder / "tokenizer.json")
    return folder, model


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _hf_greedy(model, ids: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new, eos_token_id=2,
                             pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_text_prompts_to_jsonl_match_transformers_greedy(llama, prompt_file, tmp_path, capsys):
    folder, reference = llama
    out = tmp_path / "out" / "samples.jsonl"
    assert main(["generate", str(folder), "--prompts", str(prompt_file), "--greedy", "--max-new-tokens", "12",
                 "--batch", "2", "--output", str(out), "--no-progress"]) == 0
    assert "wrote 3 samples" in capsys.readouterr().out
    rows = _jsonl(out)
    assert [r["key"] for r in rows] == ["line-00000001", "line-00000003", "line-00000005"]  # blanks skipped
    tok = load_tokenizer(folder)
    for row, text in zip(rows, [PROMPTS[0], PROMPTS[2], PROMPTS[4]]):
        assert set(row) == {"key", "prompt", "completion", "prompt_ids", "completion_ids", "ended_at_eos"}
        assert row["prompt"] == text and row["prompt_ids"] == tok.encode(text).ids
        assert row["completion_ids"] == _hf_greedy(reference, row["prompt_ids"], 12), row["key"]
        assert row["ended_at_eos"] == (row["completion_ids"][-1] == 2)
        assert len(row["completion_ids"]) == 12 or row["ended_at_eos"]
        text_ids = row["completion_ids"][:-1] if row["ended_at_eos"] else row["completion_ids"]
        assert row["completion"] == tok.decode(text_ids, skip_special_tokens=False)


def test_token_shard_prompts_are_the_first_tokens_keyed_by_sample(llama, tmp_path, capsys):
    folder, reference = llama
    make_token_shards(tmp_path / "shards", [2, 3], seq_len=8, vocab_size=VOCAB)
    out = tmp_path / "s.jsonl"
    args = ["generate", str(folder), "--tokens", str(tmp_path / "shards"), "--prompt-len", "5", "--limit", "3",
            "--max-new-tokens", "6", "--top-k", "30", "--seed", "3", "--no-progress"]
    assert main([*args, "--batch", "3", "--output", str(out)]) == 0
    rows = _jsonl(out)
    assert [r["key"] for r in rows] == ["shard-000000-000000", "shard-000000-000001", "shard-000001-000000"]
    assert [r["prompt_ids"][:2] for r in rows] == [[0, 0], [0, 1], [1, 0]]  # shardmaker: (shard, offset) first
    assert all(len(r["prompt_ids"]) == 5 and 1 <= len(r["completion_ids"]) <= 6 for r in rows)
    # a row's draws depend on (seed, key), not on the batch it was decoded in
    assert main([*args, "--batch", "1", "--output", str(tmp_path / "b1.jsonl")]) == 0
    assert _jsonl(tmp_path / "b1.jsonl") == rows
    assert main([*args, "--batch", "1", "--seed", "4", "--output", str(tmp_path / "s4.jsonl")]) == 0
    assert [r["completion_ids"] for r in _jsonl(tmp_path / "s4.jsonl")] != [r["completion_ids"] for r in rows]


def test_printed_output_without_a_tokenizer_shows_ids(llama, tmp_path, capsys):
    folder, _ = llama
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    make_token_shards(tmp_path / "shards", [2], seq_len=8, vocab_size=VOCAB)
    capsys.readouterr()
    assert main(["generate", str(bare), "--tokens", str(tmp_path / "shards"), "--prompt-len", "4", "--greedy",
                 "--max-new-tokens", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("── shard-000000-") == 2 and "prompt ids:     [0, 0, " in printed
    assert "completion ids: [" in printed


def test_printed_output_decodes_text(llama, prompt_file, capsys):
    folder, _ = llama
    assert main(["generate", str(folder), "--prompts", str(prompt_file), "--limit", "1", "--max-new-tokens", "4",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "prompt:     It is a truth\n" in printed and "completion: " in printed and "line-00000003" not in printed


def _error(args, capsys) -> str:
    assert main(["generate", *args, "--no-progress"]) == 2
    return capsys.readouterr().err


def test_bad_input_is_a_clear_error(llama, prompt_file, tmp_path, capsys):
    folder, _ = llama
    out = tmp_path / "never.jsonl"
    common = ["--output", str(out)]
    assert "nothing.txt: no such prompt file" in _error([str(folder), "--prompts", str(tmp_path / "nothing.txt"),
                                                          *common], capsys)
    assert "no such model folder" in _error([str(tmp_path / "nomodel"), "--prompts", str(prompt_file)], capsys)
    assert "not a model: expected a Hugging Face folder" in _error([str(tmp_path), "--prompts", str(prompt_file)],
                                                                   capsys)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    assert "blank.txt: no prompt (every line is blank)" in _error([str(folder), "--prompts", str(blank)], capsys)
    long = tmp_path / "long.txt"
    long.write_text("a " * 300 + "\n")
    err = _error([str(folder), "--prompts", str(long), "--max-new-tokens", "8", *common], capsys)
    assert "prompt line-00000001:" in err and "exceed the model's max_position_embeddings of 256" in err
    big = tmp_path / "big.json"
    wider = load_tokenizer(folder)  # a tokenizer with more ids than the model scores
    wider.add_special_tokens([f"<extra_{i}>" for i in range(400 - wider.get_vocab_size())])
    wider.save(str(big))
    err = _error([str(folder), "--prompts", str(prompt_file), "--tokenizer", str(big)], capsys)
    assert "400 ids, more than the model's vocabulary of 300" in err
    assert "--top-k: expected >= 0, got -1" in _error([str(folder), "--prompts", str(prompt_file), "--top-k", "-1"],
                                                      capsys)
    make_token_shards(tmp_path / "shards", [1], seq_len=8, vocab_size=VOCAB)
    assert "shards hold 9 tokens" in _error([str(folder), "--tokens", str(tmp_path / "shards"), "--prompt-len", "10"],
                                      capsys)
    wide = tmp_path / "wide"
    make_token_shards(wide, [1], seq_len=8, vocab_size=1000, seed=5)
    err = _error([str(folder), "--tokens", str(wide), "--prompt-len", "9"], capsys)
    assert "outside the model's vocabulary of 300" in err
    assert not out.exists()


def test_tp_checkpoint_generates_what_its_hf_folder_generates(llama, tmp_path):
    folder, _ = llama
    assert main(["convert", "hf-to-tp", str(folder), str(tmp_path / "tp1"), "--tp", "1", "--vocab-multiple", "64"]) == 0
    make_token_shards(tmp_path / "shards", [4], seq_len=8, vocab_size=VOCAB)
    args = ["--tokens", str(tmp_path / "shards"), "--prompt-len", "3", "--max-new-tokens", "5", "--top-p", "0.9",
            "--no-progress"]
    assert main(["generate", str(folder), *args, "--output", str(tmp_path / "hf.jsonl")]) == 0
    assert main(["generate", str(tmp_path / "tp1"), *args, "--output", str(tmp_path / "tp.jsonl")]) == 0
    hf, tp = _jsonl(tmp_path / "hf.jsonl"), _jsonl(tmp_path / "tp.jsonl")
    assert [r["completion_ids"] for r in tp] == [r["completion_ids"] for r in hf]
    assert all(r["prompt"] is None and r["completion"] is None for r in tp)  # the TP folder holds no tokenizer

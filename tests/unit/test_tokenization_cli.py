"""`distill tokenize train-tokenizer|shard`: in process, with the errors that must come back as exit 2."""
from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from tests.tokenization_corpus import make_documents, write_blocks
from tokenization import format as fmt
from tokenization.verify import verify_shards


@pytest.fixture
def inputs(tmp_path):
    for i in range(3):
        write_blocks(tmp_path / f"in{i}.txt", make_documents(50, seed=i))
    return tmp_path


def _train(inputs, capsys) -> str:
    tok = str(inputs / "tok" / "tokenizer.json")
    assert main(["tokenize", "train-tokenizer", "--input", str(inputs / "in*.txt"), "--vocab-size", "400",
                 "--txt-mode", "blocks", "--out", tok]) == 0
    assert "wrote" in capsys.readouterr().out
    return tok


def _shard(inputs, tok, out, *extra) -> int:
    return main(["tokenize", "shard", "--input", str(inputs / "in*.txt"), "--tokenizer", tok, "--out", str(out),
                 "--seq-len", "24", "--txt-mode", "blocks", "--no-progress", *extra])


def test_train_then_shard_then_verify(inputs, capsys):
    tok = _train(inputs, capsys)
    assert _shard(inputs, str(inputs / "tok"), inputs / "one", "--packing", "bestfit", "--shard-max-samples", "9") == 0
    manifest = fmt.read_manifest(inputs / "one")
    assert manifest.packing == "bestfit" and manifest.vocab_size == 400 and len(manifest.shards) > 3
    assert manifest.command.startswith("distill ") and "--packing bestfit" in manifest.command
    assert verify_shards(inputs / "one") == []
    assert _shard(inputs, tok, inputs / "two", "--packing", "bestfit", "--shard-max-samples", "9",
                  "--workers", "2") == 0
    two = fmt.read_manifest(inputs / "two")
    assert two.shards == manifest.shards and two.extra == manifest.extra  # workers change nothing but the command


def test_errors_exit_2_with_a_message(inputs, capsys):
    tok = _train(inputs, capsys)
    assert _shard(inputs, str(inputs / "missing.json"), inputs / "o") == 2
    assert capsys.readouterr().err.startswith("distill: error: tokenizer: ")
    assert main(["tokenize", "shard", "--input", str(inputs / "nothing*.jsonl"), "--tokenizer", tok,
                 "--out", str(inputs / "o"), "--seq-len", "8"]) == 2
    assert "no files match" in capsys.readouterr().err
    (inputs / "bad.jsonl").write_text(json.dumps({"text": "ok"}) + "\n{oops\n")
    assert main(["tokenize", "shard", "--input", str(inputs / "bad.jsonl"), "--tokenizer", tok,
                 "--out", str(inputs / "o"), "--seq-len", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl: line 2: not valid JSON" in err and "Traceback" not in err
    assert _shard(inputs, tok, inputs / "o2", "--eos-token", "<eos>") == 2
    assert "no token '<eos>'" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["tokenize", "shard", "--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    for option in ("--input", "--tokenizer", "--out", "--seq-len", "--packing", "--text-field", "--txt-mode",
                   "--workers", "--shard-max-bytes", "--shard-max-samples", "--eos-token"):
        assert option in text


def test_a_bad_file_fails_a_parallel_run_with_its_message(inputs, capsys):
    tok = _train(inputs, capsys)
    (inputs / "in1.txt").write_bytes(b"\xff\xfe not utf-8")
    assert _shard(inputs, tok, inputs / "o", "--workers", "2") == 2
    err = capsys.readouterr().err
    assert err.startswith("distill: error: ") and "in1.txt: not valid UTF-8" in err

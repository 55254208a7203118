"""Text readers: every supported file type, glob expansion, and errors that name the file and line."""
from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tokenization.errors import TokenizationError
from tokenization.readers import expand_inputs, iter_documents

DOCS = ["first document\nwith two lines", "second — ünïcode 日本", "third"]


def _jsonl(docs, field="text") -> bytes:
    return "".join(json.dumps({field: d, "meta": 1}) + "\n" for d in docs).encode()


def test_txt_is_one_document_per_file_or_per_blank_line_block(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(DOCS) + "\n \n\n\n")
    assert list(iter_documents(path, txt_mode="blocks")) == DOCS
    assert list(iter_documents(path, txt_mode="file")) == [path.read_text()]
    with pytest.raises(TokenizationError, match="txt_mode"):
        list(iter_documents(path, txt_mode="lines"))


@pytest.mark.parametrize("name, pack", [("a.jsonl", lambda b: b), ("a.jsonl.gz", gzip.compress),
                                        ("a.jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b))])
def test_jsonl_in_every_compression(tmp_path, name, pack):
    path = tmp_path / name
    path.write_bytes(pack(_jsonl(DOCS, "body")))
    assert list(iter_documents(path, text_field="body")) == DOCS


@pytest.mark.parametrize("line, message", [("{not json", "line 2: not valid JSON"),
                                           ('{"other": "x"}', "line 2: no text field 'text'"),
                                           ('{"text": 5}', "line 2: field 'text' must be a string")])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(_jsonl(DOCS[:1]) + line.encode() + b"\n"))
    with pytest.raises(TokenizationError, match=f"bad.jsonl.gz: {message}"):
        list(iter_documents(path))


def test_corrupt_compressed_file_names_the_file(tmp_path):
    path = tmp_path / "broken.jsonl.zst"
    path.write_bytes(b"definitely not zstd")
    with pytest.raises(TokenizationError, match="broken.jsonl.zst: line 1: cannot read"):
        list(iter_documents(path))


def test_parquet_column_and_its_errors(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": DOCS, "n": [1, 2, 3]}), path)
    assert list(iter_documents(path, text_field="content")) == DOCS
    with pytest.raises(TokenizationError, match=r"a.parquet: no column 'text'; columns are \['content', 'n'\]"):
        list(iter_documents(path))
    with pytest.raises(TokenizationError, match="a.parquet: row 0: column 'n' must be a string"):
        list(iter_documents(path, text_field="n"))
    (tmp_path / "b.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(TokenizationError, match="b.parquet: not a readable parquet file"):
        list(iter_documents(tmp_path / "b.parquet"))


def test_globs_expand_sorted_and_errors_name_the_input(tmp_path):
    for name in ("b.txt", "a.txt", "c.jsonl"):
        (tmp_path / name).write_text("x")
    assert expand_inputs([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl"), str(tmp_path / "a.txt")]) == \
        [str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), str(tmp_path / "c.jsonl")]
    with pytest.raises(TokenizationError, match="no files match"):
        expand_inputs([str(tmp_path / "*.parquet")])
    with pytest.raises(TokenizationError, match="missing.txt does not exist"):
        expand_inputs([str(tmp_path / "missing.txt")])
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(TokenizationError, match="d.csv has an unsupported type"):
        expand_inputs([str(tmp_path / "d.csv")])

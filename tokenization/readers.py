"""Iterate the documents of raw text files: .txt, .jsonl, .jsonl.gz, .jsonl.zst and .parquet.

Design choice: one generator per file that yields plain strings, chosen by the file name's suffix, and
that stops at the first bad record with an error naming the file and line (or row). Nothing is
skipped silently; the cost is that one bad line in a billion stops the run until it is fixed. Empty
documents are yielded too; the shard writer decides what to do with them.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

from tokenization.errors import TokenizationError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
TXT_MODES = ("file", "blocks")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files named by `patterns` (paths or globs, each glob expanded in sorted order), first occurrence kept."""
    files: list[str] = []
    for pattern in patterns:
        if _GLOB_CHARS.search(pattern):
            matched = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matched:
                raise TokenizationError(f"input: no files match {pattern!r}")
        elif Path(pattern).is_file():
            matched = [pattern]
        else:
            raise TokenizationError(f"input: {pattern} does not exist or is not a file")
        files.extend(p for p in matched if p not in files)
    for path in files:
        suffix_of(path)
    return files


def suffix_of(path: str | Path) -> str:
    """The reader suffix of `path`; an error listing the supported ones otherwise."""
    name = str(path)
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    raise TokenizationError(f"input: {path} has an unsupported type; expected one of {', '.join(SUFFIXES)}")


def iter_documents(path: str | Path, *, text_field: str = "text", txt_mode: str = "file") -> Iterator[str]:
    """The documents of one file, in file order."""
    suffix = suffix_of(path)
    if suffix == ".txt":
        return _txt_documents(Path(path), txt_mode)
    if suffix == ".parquet":
        return _parquet_documents(Path(path), text_field)
    return _jsonl_documents(Path(path), text_field, suffix)


def _txt_documents(path: Path, txt_mode: str) -> Iterator[str]:
    if txt_mode not in TXT_MODES:
        raise TokenizationError(f"txt_mode: expected one of {TXT_MODES}, got {txt_mode!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TokenizationError(f"{path}: not valid UTF-8 ({err})") from None
    if txt_mode == "file":
        yield text
        return
    for block in _BLANK_LINES.split(text):
        block = block.strip("\n")
        if block.strip():
            yield block


def _open_text(path: Path, suffix: str) -> io.TextIOBase:
    if suffix == ".jsonl.gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if suffix == ".jsonl.zst":
        import zstandard

        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl_documents(path: Path, field: str, suffix: str) -> Iterator[str]:
    lineno = 0
    try:
        with _open_text(path, suffix) as lines:
            for lineno, line in enumerate(lines, start=1):
                if line.strip():
                    yield _field_of(path, lineno, line, field)
    except (UnicodeDecodeError, EOFError, OSError) as err:
        raise TokenizationError(f"{path}: line {lineno + 1}: cannot read ({type(err).__name__}: {err})") from None
    except Exception as err:  # zstandard.ZstdError and gzip.BadGzipFile are not all OSErrors
        if isinstance(err, TokenizationError):
            raise
        raise TokenizationError(f"{path}: line {lineno + 1}: cannot read ({type(err).__name__}: {err})") from None


def _field_of(path: Path, lineno: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise TokenizationError(f"{path}: line {lineno}: not valid JSON ({err})") from None
    if not isinstance(record, dict) or field not in record:
        raise TokenizationError(f"{path}: line {lineno}: no text field {field!r} "
                                f"(choose another with --text-field)")
    text = record[field]
    if not isinstance(text, str):
        raise TokenizationError(f"{path}: line {lineno}: field {field!r} must be a string, "
                                f"got {type(text).__name__}")
    return text


def _parquet_documents(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and friends
        raise TokenizationError(f"{path}: not a readable parquet file ({err})") from None
    names = table.schema_arrow.names
    if column not in names:
        raise TokenizationError(f"{path}: no column {column!r}; columns are {names} (choose one with --text-field)")
    row = 0
    for batch in table.iter_batches(columns=[column], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise TokenizationError(f"{path}: row {row}: column {column!r} must be a string, "
                                        f"got {type(text).__name__}")
            row += 1
            yield text

"""Iterate the documents of raw text files: .txt, .jsonl, .jsonl.gz, .jsonl.zst and .parquet.

Design choice: one generator per file that yields plain strings, chosen by the file name's suffix, and
that stops at the first bad record with an error naming the file and line (or row). Nothing is
skipped silently; the cost is that one bad line in a billion stops the run until it is fixed. Empty
documents are yielded too; the shard writer decides what to do with them.

A plain .jsonl file can also be read as a byte range [start, stop) (`byte_range`), so one large file
can be shared among workers: the range owns exactly the lines that start inside it (the line that
crosses `stop` is read to its end; the one that crosses `start` belongs to the range before), so
consecutive ranges yield every line once. Lines are split on "\n" only, in every .jsonl flavour. The
cost: a range that does not start at byte 0 does not know its line numbers, so its errors name the
line by its byte offset. Other types are read whole: a compressed stream cannot be entered in the
middle, and a .txt document (a file or a blank-line-separated block) is not a line.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tokenization.errors import TokenizationError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
TXT_MODES = ("file", "blocks")
DEFAULT_SPLIT_BYTES = 1 << 28  # 256 MiB of .jsonl, ~60M tokens: a part's dropped concat tail (< seq_len) is noise
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


def splittable(path: str | Path) -> bool:
    """Whether `path` can be read in byte ranges (`iter_documents(byte_range=...)`): plain .jsonl only."""
    return suffix_of(path) == ".jsonl"


def iter_documents(path: str | Path, *, text_field: str = "text", txt_mode: str = "file",
                   byte_range: tuple[int, int] | None = None) -> Iterator[str]:
    """The documents of one file in file order; with `byte_range=(start, stop)` (plain .jsonl only) those of
    the lines that start at a byte offset start ≤ offset < stop."""
    suffix = suffix_of(path)
    if byte_range is not None:
        if not splittable(path):
            raise TokenizationError(f"{path}: only a plain .jsonl file can be read in byte ranges")
        return _jsonl_documents(Path(path), text_field, suffix, byte_range)
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


def _open_binary(path: Path, suffix: str):
    if suffix == ".jsonl.gz":
        return gzip.open(path, "rb")
    if suffix == ".jsonl.zst":
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 - closed with the reader (closefd)
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _jsonl_documents(path: Path, field: str, suffix: str, byte_range: tuple[int, int] | None = None) -> Iterator[str]:
    start, stop = byte_range if byte_range is not None else (0, None)
    lineno, offset = 0, start

    def where() -> str:
        return f"line {lineno}" if start == 0 else f"the line at byte {offset}"

    try:
        with _open_binary(path, suffix) as lines:
            if start > 0:  # the line holding byte start - 1 started before the range: skip it
                lines.seek(start - 1)
                offset = start - 1 + len(lines.readline())
            for raw in lines:
                lineno += 1
                if stop is not None and offset >= stop:
                    break
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise TokenizationError(f"{path}: {where()}: not valid UTF-8 ({err})") from None
                if line.strip():
                    yield _field_of(path, where, line, field)
                offset += len(raw)
    except TokenizationError:
        raise
    except Exception as err:  # OSError, EOFError, gzip.BadGzipFile, zstandard.ZstdError
        lineno += 1  # the line that could not be read
        raise TokenizationError(f"{path}: {where()}: cannot read ({type(err).__name__}: {err})") from None


def _field_of(path: Path, where: Callable[[], str], line: str, field: str) -> str:
    """The text field of one JSON line; `where()` names the line in an error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise TokenizationError(f"{path}: {where()}: not valid JSON ({err})") from None
    if not isinstance(record, dict) or field not in record:
        raise TokenizationError(f"{path}: {where()}: no text field {field!r} "
                                f"(choose another with --text-field)")
    text = record[field]
    if not isinstance(text, str):
        raise TokenizationError(f"{path}: {where()}: field {field!r} must be a string, "
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

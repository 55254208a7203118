"""Rebuild the shipped Austen corpus: one .jsonl.gz per novel, one JSON line per chapter.

Input: a folder with the six novels as plain text, one file per novel, exported from the Debian package
r-cran-janeaustenr (see README.md here for the exact commands). Each novel is cut at its chapter headings
("CHAPTER IV", "Chapter 4"); front matter and volume headings are dropped, the hard-wrapped lines of each
paragraph are joined with spaces and paragraphs are separated by one blank line, so the tokenizer sees prose
rather than line breaks. The gzip header carries no name and no time, so a rebuild is byte-identical.

Usage: python data/austen/build.py EXPORTED_TEXT_DIR [OUT_DIR]
"""
from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

BOOKS = ("sense_and_sensibility", "pride_and_prejudice", "mansfield_park", "emma", "northanger_abbey", "persuasion")
CHAPTER = re.compile(r"^(CHAPTER|Chapter) [0-9IVXLC]+\.?$")
VOLUME = re.compile(r"^(VOLUME|Volume) [IVX]+$")


def chapters(text: str) -> list[str]:
    """The chapters of a novel, each as paragraphs of joined lines."""
    found, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if CHAPTER.match(line):
            current = []
            found.append(current)
        elif current is not None and not VOLUME.match(line):
            current.append(line)
    return [_paragraphs(lines) for lines in found]


def _paragraphs(lines: list[str]) -> str:
    paragraphs = " ".join(line if line else "\n" for line in lines).split("\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def write_book(name: str, text: str, out_dir: Path) -> int:
    rows = [json.dumps({"text": body, "book": name, "chapter": i + 1}, ensure_ascii=False)
            for i, body in enumerate(chapters(text))]
    with open(out_dir / f"{name}.jsonl.gz", "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as out:
            out.write(("\n".join(rows) + "\n").encode("utf-8"))
    return len(rows)


def main(argv: list[str]) -> None:
    if not 1 <= len(argv) <= 2:
        sys.exit(__doc__)
    source, out_dir = Path(argv[0]), Path(argv[1] if len(argv) > 1 else Path(__file__).parent)
    for name in BOOKS:
        count = write_book(name, (source / f"{name}.txt").read_text(encoding="utf-8"), out_dir)
        print(f"{name}: {count} chapters")


if __name__ == "__main__":
    main(sys.argv[1:])

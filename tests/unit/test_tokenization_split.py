"""One large .jsonl cut into --split-bytes parts: every line read once, and the same bytes whoever does the work.

The corpus is one small file with a split size small enough for ~20 parts, long lines that cross several
part boundaries, blank lines and empty documents. Folders made with 1 or 4 workers, or by 3 job-array tasks,
must hold the same files byte for byte (the manifest's command line aside, which names the options given),
and the documents in the shards must be exactly those of the file, compared with an independent reading.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.tokenization_corpus import make_documents, read_shard_folder
from tokenization.errors import TokenizationError
from tokenization.readers import iter_documents
from tokenization.shards import plan_parts, shard_corpus
from tokenization.tokenizer import eos_id, load_tokenizer, train_tokenizer
from tokenization.verify import verify_shards

SPLIT = 1500


def _lines(seed: int) -> list[str]:
    """JSON lines: short and long documents (a long one spans several SPLIT ranges), blanks, empty texts."""
    rng = random.Random(seed)
    docs = make_documents(160, seed=seed, words=(3, 60)) + make_documents(6, seed=seed + 1, words=(500, 700))
    rng.shuffle(docs)
    lines = [json.dumps({"text": d, "id": i}, ensure_ascii=i % 2 == 0) for i, d in enumerate(docs)]
    for at in (5, 40, 90):
        lines.insert(at, "")
        lines.insert(at + 1, json.dumps({"text": ""}))
    return lines


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("split")
    big = root / "big.jsonl"
    big.write_text("\n".join(_lines(0)) + "\n", encoding="utf-8")
    tok = root / "tokenizer.json"
    train_tokenizer([big], 400, out_path=tok)
    one = root / "one"
    assert main(_args(big, tok, one, "--workers", "1")) == 0
    return big, tok, one


def _args(big: Path, tok: Path, out: Path, *extra: str, packing: str = "concat") -> list[str]:
    return ["tokenize", "shard", "--input", str(big), "--tokenizer", str(tok), "--out", str(out), "--seq-len", "32",
            "--packing", packing, "--split-bytes", str(SPLIT), "--shard-max-samples", "16", "--no-progress", *extra]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative name, the manifest without its command line."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    manifest = json.loads(files["manifest.json"])
    manifest.pop("command")
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def _parts(folder: Path) -> int:
    return len(list((folder / "_progress").glob("0*.json")))


def test_the_file_is_cut_into_parts_owning_their_lines(corpus):
    big, _, one = corpus
    size = big.stat().st_size
    assert _parts(one) == math.ceil(size / SPLIT) >= 10
    records = [json.loads(p.read_text()) for p in sorted((one / "_progress").glob("0*.json"))]
    assert [(r["start"], r["stop"]) for r in records] == [(a, min(a + SPLIT, size)) for a in range(0, size, SPLIT)]
    assert any(r["documents"] == 0 for r in records)  # a part inside one long line owns no line
    starts = {name.split("-")[0] for name in (e.name for e in read_shard_folder(one)[0].shards)}
    assert len(starts) > 5  # shards come from many parts, each named after its part
    assert verify_shards(one) == []


def test_four_workers_write_the_same_bytes_as_one(corpus, tmp_path):
    big, tok, one = corpus
    four = tmp_path / "four"
    assert main(_args(big, tok, four, "--workers", "4")) == 0
    assert _files(four) == _files(one)


def test_three_array_tasks_write_the_same_bytes_as_one_run(corpus, tmp_path, capsys, monkeypatch):
    big, tok, one = corpus
    out = tmp_path / "array"
    count = _parts(one)
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    capsys.readouterr()
    for task in (2, 0, 1):
        assert not (out / "manifest.json").exists()
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task))
        assert main(_args(big, tok, out, "--workers", "1", "--files", "array")) == 0
        first, last = task * count // 3, (task + 1) * count // 3 - 1
        said = capsys.readouterr().out
        assert f"tokenized parts {first}-{last} of {count}" in said or "wrote" in said, said
    assert _files(out) == _files(one)
    assert "--files" not in json.loads((out / "manifest.json").read_text())["command"]


@pytest.mark.parametrize("ending", ["\n", "\r\n"])
def test_every_split_size_reads_every_line_once(tmp_path, ending):
    lines = ['{"text": "a"}', "", '{"text": "bé 日本"}', '{"text": ""}', "   ", json.dumps({"text": "x" * 40}),
             '{"text": "c", "n": 1}', '{"text": "last"}']
    path = tmp_path / "small.jsonl"
    path.write_bytes(ending.join(lines).encode())  # no final newline: the last line ends at the end of file
    want = [json.loads(line)["text"] for line in lines if line.strip()]
    size = path.stat().st_size
    assert list(iter_documents(path)) == want
    for split in range(1, size + 2):
        parts = plan_parts([str(path)], [size], split)
        got = [doc for part in parts
               for doc in iter_documents(path, byte_range=None if part.stop is None else (part.start, part.stop))]
        assert got == want, f"split every {split} bytes"


def test_shards_hold_each_document_exactly_once(corpus, tmp_path):
    """bestfit keeps whole documents (each fits a window here), so the shards' documents can be counted.

    The split size is the offset of a line start, so one boundary falls exactly on a line's first byte."""
    big, tok, _ = corpus
    data = big.read_bytes()
    split = next(i + 1 for i in range(1200, len(data)) if data[i] == ord("\n"))
    out = tmp_path / "bestfit"
    args = _args(big, tok, out, "--workers", "2", packing="bestfit")
    args[args.index("--seq-len") + 1], args[args.index("--split-bytes") + 1] = "2048", str(split)
    assert main(args) == 0
    assert _parts(out) >= 10
    tokenizer = load_tokenizer(tok)
    eos = eos_id(tokenizer)
    texts = [json.loads(line)["text"] for line in big.read_text(encoding="utf-8").split("\n") if line.strip()]
    want = Counter(tuple(tokenizer.encode(t, add_special_tokens=False).ids) + (eos,) for t in texts if t)
    assert max(len(doc) for doc in want) <= 2049 and sum(want.values()) == 166
    manifest, samples = read_shard_folder(out)
    got = Counter(tuple(tokens[a:b].tolist()) for _, tokens, segments in samples
                  for a, b in zip(segments[:-1], segments[1:]))
    assert got == want
    assert manifest.extra["documents"] == 166 and manifest.extra["split_bytes"] == split


def test_a_bad_line_in_a_later_range_is_named_by_its_byte_offset(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = '{"text": "fine"}\n'
    path.write_text(good * 3 + "{broken\n" + good)
    offset = len(good) * 3
    with pytest.raises(TokenizationError, match=rf"bad.jsonl: the line at byte {offset}: not valid JSON"):
        list(iter_documents(path, byte_range=(offset - 5, offset + 30)))
    with pytest.raises(TokenizationError, match=r"bad.jsonl: line 4: not valid JSON"):
        list(iter_documents(path, byte_range=(0, offset + 1)))


def test_an_input_that_changed_size_is_refused_on_rerun(corpus, tmp_path):
    _, tok, _ = corpus
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(30, seed=7)))
    out = tmp_path / "out"
    assert main(_args(small, tok, out)) == 0
    with small.open("a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")  # the parts would move: refuse rather than mix
    with pytest.raises(TokenizationError, match="input_sizes differ; an input file changed size since that run"):
        shard_corpus([str(small)], tok, out, seq_len=32, split_bytes=SPLIT, shard_max_samples=16, progress=False)

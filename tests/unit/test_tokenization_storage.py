"""Token shards on disk: at seq_len 2048 a shard costs at most 1.15 × its token ids (the payload).

Measured on shards the real writer produces: `shard_corpus` on generated text with a trained tokenizer,
and the shard sink fed uniformly random ids, which no compression can shrink (the worst case). Format 1
(plain tars with PAX headers) failed both at 2.2× and 2.5×. A rerun into a format 1 folder is refused.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.tokenization_corpus import make_documents, read_shard_folder, write_blocks
from tokenization import format as fmt
from tokenization.errors import TokenizationError
from tokenization.shards import JOB_FILE, PROGRESS_DIR, _ShardSink, shard_corpus
from tokenization.tokenizer import train_tokenizer

SEQ_LEN = 2048
LIMIT = 1.15


def _ratio(folder, entries, seq_len: int, itemsize: int) -> float:
    stored = sum((folder / e.name).stat().st_size for e in entries)
    return stored / (sum(e.samples for e in entries) * (seq_len + 1) * itemsize)


def test_written_shards_cost_at_most_1_15_times_their_ids(tmp_path):
    corpus = write_blocks(tmp_path / "corpus.txt", make_documents(300, seed=3, words=(20, 120)))
    train_tokenizer([corpus], 500, out_path=tmp_path / "tok.json", txt_mode="blocks")
    manifest = shard_corpus([str(corpus)], tmp_path / "tok.json", tmp_path / "out", seq_len=SEQ_LEN,
                            txt_mode="blocks", shard_max_samples=8, progress=False)
    assert manifest.total_samples >= 8 and manifest.dtype == np.uint16
    assert _ratio(tmp_path / "out", manifest.shards, SEQ_LEN, 2) <= LIMIT


def test_incompressible_ids_cost_at_most_1_15_times_and_read_back(tmp_path):
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 65535, (6, SEQ_LEN + 1)).astype(np.uint16)
    sink = _ShardSink(tmp_path, 0, max_bytes=1 << 30, max_samples=4)
    for window in windows:
        sink.write(window, np.array([0, 100, SEQ_LEN + 1], np.int32))
    entries = sink.close()
    assert [e.name for e in entries] == [f"00000-0000{i}{fmt.SHARD_SUFFIX}" for i in range(2)]
    assert _ratio(tmp_path, entries, SEQ_LEN, 2) <= LIMIT
    fmt.write_manifest(tmp_path, fmt.Manifest("f" * 64, 65535, 0, SEQ_LEN, "concat", tuple(entries)))
    _, samples = read_shard_folder(tmp_path)  # plain webdataset, as any pipeline would read them
    assert [key for key, _, _ in samples] == [f"00000-{i:09d}" for i in range(6)]
    assert np.array_equal(np.stack([tokens for _, tokens, _ in samples]), windows)


def test_rerun_into_a_format_1_folder_is_refused(tmp_path):
    """A format 1 run's job record has no format_version: its done records must not be mixed into a v2 manifest."""
    corpus = write_blocks(tmp_path / "corpus.txt", make_documents(40, seed=4))
    train_tokenizer([corpus], 300, out_path=tmp_path / "tok.json", txt_mode="blocks")
    out = tmp_path / "out"
    shard_corpus([str(corpus)], tmp_path / "tok.json", out, seq_len=16, txt_mode="blocks", progress=False)
    job = out / PROGRESS_DIR / JOB_FILE
    job.write_text(json.dumps({k: v for k, v in json.loads(job.read_text()).items() if k != "format_version"}))
    with pytest.raises(TokenizationError, match=f"{out}: holds shards made with other settings \\(format_version "
                                                f"differ"):
        shard_corpus([str(corpus)], tmp_path / "tok.json", out, seq_len=16, txt_mode="blocks", progress=False)

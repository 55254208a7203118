"""Data-path throughput: the tokenizer (tokenization/) and the reader (pipeline.data), each against a baseline
measured in the same run.

`--part tokenize`: writes a deterministic synthetic English-like corpus (default ~32 MB in 4 jsonl files,
Zipf-distributed pseudo-words in sentences and paragraphs; no downloads) to a temporary directory, trains a
byte-level BPE tokenizer (`train_tokenizer`, default vocab 8192) on the first file, then times:
- **raw encoder**: `tokenizers`' `encode_batch_fast` (or `encode_batch`) on the same documents, held in
  memory, in batches of `shards.ENCODE_BATCH`, in this process (the floor of what tokenizing costs);
- **shard_corpus**: the whole pipeline (read jsonl, tokenize, add EOS, concat-pack, write fsynced tar
  shards, manifest) on the same files with workers=1, and optionally workers=2 (tokens/s per worker).
Both sides run with the same `RAYON_NUM_THREADS` (default 1; set before `tokenizers` is imported) and
`TOKENIZERS_PARALLELISM=true`, so "per worker" means per tokenizer thread. Target: ≥ 0.8 × raw per worker.

`--part storage`: shard bytes against the token payload (`samples × (seq_len + 1) × itemsize`) on shards
the real writer produces: `shard_corpus` on the quickstart's training novels (data/austen, real English)
with a byte-level BPE tokenizer of the quickstart's vocabulary (4096) trained on them, at seq_len 2048 and
at the quickstart's 128; and the shard sink fed uniformly random uint16 ids (incompressible: the worst
case) at seq_len 2048. Target: shard bytes ≤ 1.15 × payload at seq_len 2048.

`--part read`: writes a synthetic token-shard folder (default ~200 MB of token ids: seq_len 2048, uint16
ids, 1000-sample shards) to a temporary directory, then times, in this process with one torch thread:
- **ours**: `TokenShardDataset` (shuffled shard order and windows, DP rank 0 of 1, no sidecar, no
  workers), decoding to int64 `[B, seq_len+1]` tensors;
- **baseline**: `webdataset.WebDataset(urls, shardshuffle=False)` with `np.load` of each sample's tokens
  (no batching, no shuffling, no tensors), the floor of what reading these tars costs.
Each is run once to warm the page cache, then timed over one epoch.

Run: .venv/bin/python benchmarks/data.py [--part tokenize|storage|read|all] [--corpus-mb 32] [--threads 1]
     [--workers 1,2] [--megabytes 200] [--seq-len 2048] [--storage-seq-lens 2048,128]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _threads_from_argv() -> str:
    """`--threads` must reach the environment before `tokenizers` (and its rayon pool) is imported."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
    return "1"


os.environ["RAYON_NUM_THREADS"] = _threads_from_argv()
os.environ["TOKENIZERS_PARALLELISM"] = "true"

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.data import TokenShardDataset
from tests.shardmaker import make_token_shards
from tokenization.format import read_manifest
from tokenization.readers import iter_documents
from tokenization.shards import ENCODE_BATCH, _ShardSink, shard_corpus
from tokenization.tokenizer import load_tokenizer, train_tokenizer

_COMMON = ["the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by",
           "at", "this", "are", "from", "or", "have", "an", "they", "which", "one", "you", "were", "her", "all",
           "she", "there", "would", "their", "we", "him", "been", "has", "when", "who", "will", "more", "no", "if",
           "out", "so", "said", "what", "up", "its", "about", "into", "than", "them", "can", "only", "other", "new",
           "some", "could", "time", "these", "two", "may", "then", "do", "first", "any", "my", "now", "such", "like",
           "our", "over", "man", "me", "even", "most", "made", "after", "also", "did", "many", "before", "must",
           "through"]
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "th", "st",
           "ch", "sh", "pr", "tr", "gr", "bl", "str"]
_VOWELS = ["a", "e", "i", "o", "u", "ea", "ou", "io", "ai", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "ck", "rt", "ed", "ing", "ly", "tion"]


# --- tokenization half -------------------------------------------------------------------------------------

def make_lexicon(rng: np.random.Generator, size: int) -> tuple[list[str], np.ndarray]:
    """Common English words then syllable-built pseudo-words, with Zipf-like sampling weights."""
    words, seen = list(_COMMON), set(_COMMON)
    while len(words) < size:
        parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                 for _ in range(int(rng.integers(1, 4)))]
        word = "".join(parts) + _CODAS[rng.integers(len(_CODAS))]
        if word not in seen:
            seen.add(word)
            words.append(word)
    weights = 1.0 / (np.arange(size) + 2.7)
    return words, weights / weights.sum()


def make_document(rng: np.random.Generator, lexicon: list[str], weights: np.ndarray, target_chars: int) -> str:
    """Paragraphs of capitalised sentences with commas, numbers now and then, ending in . ? or !"""
    ids = rng.choice(len(lexicon), size=target_chars // 5 + 8, p=weights)
    paragraphs, sentence_words, pos = [], [], 0
    while pos < len(ids) - 4:
        n = int(rng.integers(4, 25))
        words = [lexicon[i] for i in ids[pos:pos + n]]
        pos += n
        if rng.random() < 0.3:
            words[int(rng.integers(len(words)))] += ","
        if rng.random() < 0.1:
            words.insert(int(rng.integers(len(words))), str(int(rng.integers(1, 2100))))
        sentence_words.append(" ".join(words).capitalize() + ".?!"[int(rng.choice(3, p=[0.9, 0.06, 0.04]))])
        if rng.random() < 0.2:
            paragraphs.append(" ".join(sentence_words))
            sentence_words = []
    paragraphs.append(" ".join(sentence_words))
    return "\n\n".join(p for p in paragraphs if p)


def make_corpus(folder: Path, megabytes: float, files: int, seed: int = 0) -> list[str]:
    """`files` jsonl files of about `megabytes` MB in all, the same bytes for the same arguments."""
    rng = np.random.default_rng(seed)
    lexicon, weights = make_lexicon(rng, 20000)
    paths, per_file = [], int(megabytes * 2**20 / files)
    for index in range(files):
        path = folder / f"corpus-{index:02d}.jsonl"
        written = 0
        with open(path, "w", encoding="utf-8") as out:
            while written < per_file:
                text = make_document(rng, lexicon, weights, int(rng.lognormal(8.0, 0.8)))
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line)
        paths.append(str(path))
    return paths


def encode_raw(tokenizer_path: Path, files: list[str]) -> tuple[float, int, int]:
    """(seconds, documents, tokens) of the bare batch encoder over every document, texts already in memory."""
    tok = load_tokenizer(tokenizer_path)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    docs = [d for path in files for d in iter_documents(path) if d]
    encode(docs[:64], add_special_tokens=False)  # warm-up: first-call costs out of the timing
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(docs), ENCODE_BATCH):
        tokens += sum(len(e.ids) for e in encode(docs[i:i + ENCODE_BATCH], add_special_tokens=False))
    return time.perf_counter() - start, len(docs), tokens


def encode_pipeline(tokenizer_path: Path, files: list[str], out_dir: Path, workers: int,
                    seq_len: int) -> tuple[float, int, int]:
    """(seconds, documents, tokens) of `shard_corpus` end to end into a fresh folder; tokens include EOS."""
    start = time.perf_counter()
    manifest = shard_corpus(files, tokenizer_path, out_dir, seq_len=seq_len, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    documents = manifest.extra["documents"]
    tokens = sum(e.tokens for e in manifest.shards) + manifest.extra["dropped_tokens"]
    return seconds, documents, tokens - documents  # EOS ids are not the encoder's output: compare like with like


def run_tokenize(args: argparse.Namespace) -> None:
    import tokenizers

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        files = make_corpus(Path(tmp), args.corpus_mb, args.corpus_files)
        size = sum(Path(f).stat().st_size for f in files)
        print(f"wrote {len(files)} jsonl files, {size / 2**20:.1f} MB in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        tokenizer_path = Path(tmp) / "tokenizer.json"
        train_tokenizer(files[:1], args.vocab_size, out_path=tokenizer_path)
        print(f"trained byte-level BPE, vocab {args.vocab_size}, on {files[0].rsplit('/', 1)[-1]} "
              f"in {time.perf_counter() - start:.1f} s")
        rows = [("raw encode_batch", 1, *encode_raw(tokenizer_path, files))]
        for workers in args.workers:
            rows.append((f"shard_corpus workers={workers}", workers,
                         *encode_pipeline(tokenizer_path, files, Path(tmp) / f"out-{workers}", workers, args.seq_len)))
    base = rows[0][4] / rows[0][2]
    print(f"RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}, TOKENIZERS_PARALLELISM=true, "
          f"batch {ENCODE_BATCH} documents, seq_len {args.seq_len} (concat), tokenizers {tokenizers.__version__}, "
          f"{size / 2**20:.1f} MB")
    print("| side | workers | documents | tokens | s | tokens/s | tokens/s per worker | per worker / raw |")
    print("|---|---|---|---|---|---|---|---|")
    for name, workers, seconds, documents, tokens in rows:
        rate = tokens / seconds
        print(f"| {name} | {workers} | {documents} | {tokens} | {seconds:.2f} | {rate:,.0f} | {rate / workers:,.0f} "
              f"| {rate / workers / base:.2f} |")


# --- storage ---------------------------------------------------------------------------------------------

AUSTEN = ["sense_and_sensibility", "pride_and_prejudice", "mansfield_park", "emma", "northanger_abbey"]


def storage_row(name: str, folder: Path, entries, seq_len: int, itemsize: int) -> tuple:
    samples = sum(e.samples for e in entries)
    stored = sum((folder / e.name).stat().st_size for e in entries)
    return name, seq_len, samples, len(entries), samples * (seq_len + 1) * itemsize, stored


def random_id_shards(folder: Path, seq_len: int, samples: int) -> list:
    """Uniformly random uint16 ids through the tokenizer's shard sink: nothing for gzip to squeeze."""
    rng = np.random.default_rng(0)
    sink = _ShardSink(folder, 0, max_bytes=1 << 30, max_samples=samples)
    for _ in range(samples):
        sink.write(rng.integers(0, 65535, seq_len + 1).astype(np.uint16), np.array([0, seq_len + 1], np.int32))
    return sink.close()


def run_storage(args: argparse.Namespace) -> None:
    root = Path(__file__).resolve().parent.parent / "data" / "austen"
    files = [str(root / f"{name}.jsonl.gz") for name in AUSTEN]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = Path(tmp) / "tokenizer.json"
        train_tokenizer(files, args.storage_vocab, out_path=tokenizer_path)
        for seq_len in args.storage_seq_lens:
            out = Path(tmp) / f"austen-{seq_len}"
            shard_corpus(files, tokenizer_path, out, seq_len=seq_len, progress=False)
            manifest = read_manifest(out)
            rows.append(storage_row("austen, BPE", out, manifest.shards, seq_len, manifest.dtype.itemsize))
        out = Path(tmp) / "random"
        out.mkdir()
        rows.append(storage_row("random uint16 ids", out, random_id_shards(out, 2048, 400), 2048, 2))
    print(f"token shards: {len(AUSTEN)} novels of data/austen, byte-level BPE vocab {args.storage_vocab}, concat "
          f"packing, default shard limits; payload = samples × (seq_len + 1) × 2 bytes (uint16 ids)")
    print("| ids | seq_len | samples | shards | payload bytes | shard bytes | shard / payload | target |")
    print("|---|---|---|---|---|---|---|---|")
    for name, seq_len, samples, shards, payload, stored in rows:
        target = "≤ 1.15" if seq_len == 2048 else "-"
        met = "" if seq_len != 2048 else (" (met)" if stored <= 1.15 * payload else " (NOT met)")
        print(f"| {name} | {seq_len} | {samples} | {shards} | {payload:,} | {stored:,} | {stored / payload:.3f} | "
              f"{target}{met} |")


# --- reader half -------------------------------------------------------------------------------------------

def read_ours(folder: Path, micro_batch: int) -> tuple[int, int]:
    dataset = TokenShardDataset(str(folder), micro_batch=micro_batch, dp_rank=0, dp_size=1, seed=0, max_epochs=1)
    samples = tokens = 0
    for batch in dataset:
        samples += batch["tokens"].shape[0]
        tokens += batch["tokens"].numel()
    return samples, tokens


def read_baseline(folder: Path, micro_batch: int) -> tuple[int, int]:
    import webdataset as wds
    urls = [str(folder / e.name) for e in read_manifest(folder).shards]
    samples = tokens = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        array = np.load(io.BytesIO(sample["tokens.npy"]))
        samples, tokens = samples + 1, tokens + array.size
    return samples, tokens


def timed(fn, folder: Path, micro_batch: int) -> tuple[float, int, int]:
    fn(folder, micro_batch)  # warm the page cache
    start = time.perf_counter()
    samples, tokens = fn(folder, micro_batch)
    return time.perf_counter() - start, samples, tokens


def run_read(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    total = int(args.megabytes * 2**20 / (2 * (args.seq_len + 1)))  # megabytes of uint16 ids
    full, rest = divmod(total, args.shard_samples)
    shards = [args.shard_samples] * full + ([rest] if rest else [])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_token_shards(tmp, shards, seq_len=args.seq_len, vocab_size=32000)
        size = sum(Path(tmp, e.name).stat().st_size for e in read_manifest(tmp).shards)
        seconds = time.perf_counter() - start
        print(f"wrote {len(shards)} shards, {total} samples, {size / 2**20:.0f} MB in {seconds:.1f} s")
        rows = [("ours", *timed(read_ours, Path(tmp), args.micro_batch)),
                ("webdataset baseline", *timed(read_baseline, Path(tmp), args.micro_batch))]
    base = rows[1][3] / rows[1][1]
    print(f"seq_len={args.seq_len}, micro_batch={args.micro_batch}, 1 torch thread, torch {torch.__version__}")
    print("| reader | samples | s | samples/s | tokens/s | vs baseline |")
    print("|---|---|---|---|---|---|")
    for name, seconds, samples, tokens in rows:
        print(f"| {name} | {samples} | {seconds:.2f} | {samples / seconds:,.0f} | {tokens / seconds:,.0f} | "
              f"{tokens / seconds / base:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("tokenize", "storage", "read", "all"), default="all")
    parser.add_argument("--corpus-mb", type=float, default=32, help="tokenize: synthetic corpus size")
    parser.add_argument("--corpus-files", type=int, default=4, help="tokenize: jsonl files (≥ workers)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenize: BPE vocabulary")
    parser.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",")], default=[1, 2],
                        help="tokenize: comma-separated shard_corpus worker counts")
    parser.add_argument("--threads", type=int, default=1, help="tokenize: RAYON_NUM_THREADS for both sides")
    parser.add_argument("--storage-vocab", type=int, default=4096, help="storage: BPE vocabulary (the quickstart's)")
    parser.add_argument("--storage-seq-lens", type=lambda s: [int(n) for n in s.split(",")], default=[2048, 128],
                        help="storage: comma-separated seq_lens")
    parser.add_argument("--megabytes", type=float, default=200, help="read: MB of token ids in the synthetic folder")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--shard-samples", type=int, default=1000, help="read: samples per shard")
    parser.add_argument("--micro-batch", type=int, default=8, help="read: samples per batch")
    args = parser.parse_args()
    if args.part in ("tokenize", "all"):
        run_tokenize(args)
    if args.part in ("storage", "all"):
        run_storage(args)
    if args.part in ("read", "all"):
        run_read(args)


if __name__ == "__main__":
    main()

"""Write token shards: tokenize, pack and store each part of the input as webdataset shards (.tar.gz), then
the manifest.

Design choice: the unit of work is a part: one input file, or, for a plain .jsonl file larger than
`split_bytes`, one byte range of it (ranges of `split_bytes` from byte 0, each owning the lines that start
in it; see readers.py). The parts follow from the sorted inputs, their sizes and `split_bytes` alone, never
from the worker count, so part `i` is tokenized and packed on its own into shards `{i:05d}-{j:05d}.tar.gz`
with keys `{i:05d}-{sample:09d}`: workers process parts in parallel without talking to each other, keys
and bytes never depend on scheduling, and a rerun after a kill redoes only the parts without a done
record (`_progress/{i:05d}.json`, written atomically after the part's shards). Each shard is written under
a temporary name, fsynced and renamed. When no file is split, part i is file i. The costs: packing
restarts at every part, so in concat mode each part drops its tail (< seq_len + 1 tokens; counted in the
manifest's `extra.dropped_tokens`); a compressed .jsonl, a .txt or a .parquet file is one part however
large (a compressed stream cannot be entered in the middle), so one huge such file still takes one worker;
and the input sizes are part of the job, so an input that changes between a run and its rerun is refused.

Workers are forked processes under a ProcessPoolExecutor (a dead worker fails the run rather than
hanging it); each exits by itself when its parent is killed, so it cannot race a rerun in the folder.
`_progress/job.json` records the settings; a rerun with other settings in the same folder is refused.

A run may take only parts START ≤ i < STOP (`part_range`, a Slurm job array's slice). Array tasks share
one folder: their parts, shards and done records never collide, job.json is created once with a hard
link (the first task's settings win, a task with other settings is refused), and the manifest is written
by whichever run finds every part done; a run that leaves parts missing writes none and returns None.
The cost: nothing waits for the other tasks, so the folder has no manifest until the last range is done
(rerunning any range, even an empty one, writes it if every part is done).

Input without text is an error, never an empty success: an empty input file is refused before anything
is written, a file whose documents are all empty fails its part (no done record) or, when split, the run
that would write the manifest, and so does a corpus that fills no sample; no manifest is written then.

A shard entry's `tokens` counts real tokens (the sum of each sample's `segments[-1]`), so padding is
not counted; `samples * (seq_len + 1)` ids are stored.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import queue as queue_lib
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tokenization import format as fmt
from tokenization.errors import TokenizationError
from tokenization.packing import ConcatPacker, bestfit, with_eos
from tokenization.readers import DEFAULT_SPLIT_BYTES, expand_inputs, iter_documents, splittable, suffix_of
from tokenization.tokenizer import DEFAULT_EOS, eos_id, fingerprint, load_tokenizer, vocab_size

PROGRESS_DIR = "_progress"
JOB_FILE = "job.json"
ENCODE_BATCH = 1024  # documents per encode_batch call; larger batches keep tokenizers' threads busy


@dataclass(frozen=True)
class ShardJob:
    """Everything that decides the bytes of the shards; a rerun must use the same."""

    inputs: tuple
    tokenizer_path: str
    tokenizer_fingerprint: str
    seq_len: int
    packing: str = "concat"
    text_field: str = "text"
    txt_mode: str = "file"
    eos_token: str = DEFAULT_EOS
    shard_max_bytes: int = 1 << 30
    shard_max_samples: int = 100_000
    input_sizes: tuple = ()
    split_bytes: int = DEFAULT_SPLIT_BYTES
    format_version: int = fmt.FORMAT_VERSION  # a folder written by another format version is refused, not mixed


@dataclass(frozen=True)
class Part:
    """One unit of work: input file `file` whole (`stop` None), or the lines that start in bytes [start, stop)."""

    file: int
    start: int = 0
    stop: int | None = None


def plan_parts(files: Sequence[str], sizes: Sequence[int], split_bytes: int) -> list[Part]:
    """The parts of the inputs in order: a plain .jsonl larger than `split_bytes` (> 0) is cut every
    `split_bytes` bytes, every other file is one part."""
    parts: list[Part] = []
    for i, (path, size) in enumerate(zip(files, sizes)):
        if 0 < split_bytes < size and splittable(path):
            parts.extend(Part(i, start, min(start + split_bytes, size)) for start in range(0, size, split_bytes))
        else:
            parts.append(Part(i))
    return parts


def corpus_parts(inputs: Sequence[str], split_bytes: int = DEFAULT_SPLIT_BYTES) -> tuple[tuple, tuple, list[Part]]:
    """(files, their sizes, parts) of `inputs` (paths or globs) as `shard_corpus` numbers them."""
    if split_bytes < 0:
        raise TokenizationError(f"split_bytes: expected ≥ 0 (0: never split a file), got {split_bytes}")
    files = tuple(expand_inputs(list(inputs)))
    sizes = tuple(os.stat(f).st_size for f in files)
    return files, sizes, plan_parts(files, sizes, split_bytes)


def shard_name(file_index: int, shard_index: int) -> str:
    return f"{file_index:05d}-{shard_index:05d}{fmt.SHARD_SUFFIX}"


def sample_key(file_index: int, sample_index: int) -> str:
    return f"{file_index:05d}-{sample_index:09d}"


class _ShardSink:
    """Rolls over to a new shard of one input file when the current one reaches its size or count limit."""

    def __init__(self, out_dir: Path, file_index: int, max_bytes: int, max_samples: int):
        self.out_dir, self.file_index = out_dir, file_index
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.entries: list[fmt.ShardEntry] = []
        self._writer = None
        self.samples = 0

    def write(self, tokens: np.ndarray, segments: np.ndarray) -> None:
        if self._writer is None or self._count >= self.max_samples or self._file.size >= self.max_bytes:
            self._finish_shard()
            self._open_shard()
        self._writer.write(fmt.encode_sample(sample_key(self.file_index, self.samples), tokens, segments))
        self.samples += 1
        self._count += 1
        self._tokens += int(segments[-1])

    def _open_shard(self) -> None:
        self._name = shard_name(self.file_index, len(self.entries))
        self._tmp = self.out_dir / f".{self._name}.tmp"
        self._file = fmt.HashingFile(self._tmp)
        self._writer = fmt.ShardWriter(self._file)
        self._count = self._tokens = 0

    def _finish_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()  # the tar's end blocks and the gzip trailer, through the HashingFile
        self._file.file.flush()
        os.fsync(self._file.file.fileno())
        self._file.file.close()
        os.replace(self._tmp, self.out_dir / self._name)
        fmt.fsync_dir(self.out_dir)
        self.entries.append(fmt.ShardEntry(self._name, self._count, self._tokens, self._file.sha.hexdigest()))
        self._writer = None

    def close(self) -> list[fmt.ShardEntry]:
        self._finish_shard()
        return self.entries


def _clear_part_outputs(out_dir: Path, index: int) -> None:
    """Delete whatever an unfinished earlier attempt left for part `index`."""
    stale_names = (f"{index:05d}-*{fmt.SHARD_SUFFIX}", f".{index:05d}-*{fmt.SHARD_SUFFIX}.tmp")
    for stale in [path for pattern in stale_names for path in out_dir.glob(pattern)]:
        stale.unlink()


_TOKENIZERS: dict = {}
_REPORT: Callable[[int, int], None] | None = None


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


def _encoded_documents(job: ShardJob, part: Part, dtype: np.dtype, eos: int, counts: dict):
    """Each non-empty document of `part` as ids + EOS; documents and tokens counted into `counts`."""
    tok = _tokenizer(job.tokenizer_path)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    batch: list[str] = []
    docs = iter_documents(job.inputs[part.file], text_field=job.text_field, txt_mode=job.txt_mode,
                          byte_range=None if part.stop is None else (part.start, part.stop))
    for text in _with_end(docs):
        if text is not None and text:
            batch.append(text)
        if batch and (text is None or len(batch) >= ENCODE_BATCH):
            encoded = [with_eos(e.ids, eos, dtype) for e in encode(batch, add_special_tokens=False)]
            tokens = sum(len(d) for d in encoded)
            counts["documents"] += len(encoded)
            counts["tokens"] += tokens
            if _REPORT is not None:
                _REPORT(len(encoded), tokens)
            batch = []
            yield from encoded


def _with_end(items):
    yield from items
    yield None


def process_part(job: ShardJob, out_dir: str | Path, index: int, part: Part) -> dict:
    """Tokenize, pack and write the shards of part `index`, then its done record; returns the record."""
    out_dir = Path(out_dir)
    _clear_part_outputs(out_dir, index)
    path = job.inputs[part.file]
    tok = _tokenizer(job.tokenizer_path)
    dtype, eos = fmt.token_dtype(vocab_size(tok)), eos_id(tok, job.eos_token)
    counts = {"documents": 0, "tokens": 0}
    docs = _encoded_documents(job, part, dtype, eos, counts)
    sink = _ShardSink(out_dir, index, job.shard_max_bytes, job.shard_max_samples)
    dropped = 0
    if job.packing == "concat":
        packer = ConcatPacker(job.seq_len, dtype)
        for doc in docs:
            for tokens, segments in packer.add(doc):
                sink.write(tokens, segments)
        dropped = packer.pending
    else:
        for tokens, segments in bestfit(docs, job.seq_len, eos, dtype):
            sink.write(tokens, segments)
    if counts["documents"] == 0 and part.stop is None:  # nothing was written for it (no document, no shard)
        raise TokenizationError(_no_documents(job, [path]))
    record = {"input": path, "start": part.start, "stop": part.stop, "documents": counts["documents"],
              "tokens": counts["tokens"], "dropped_tokens": dropped, "shards": [asdict(e) for e in sink.close()]}
    fmt.write_atomic(out_dir / PROGRESS_DIR / f"{index:05d}.json", json.dumps(record, indent=1).encode())
    return record


def _no_documents(job: ShardJob, paths: Sequence[str]) -> str:
    """The error for input files that hold no document, saying what each type was expected to hold."""
    expected = {".txt": "non-blank text", ".parquet": f"a row with a non-empty {job.text_field!r} column"}
    what = "; ".join(sorted({expected.get(suffix_of(p), f"a line with a non-empty {job.text_field!r} field")
                             for p in paths}))
    return (f"{', '.join(paths)}: no documents in {'this input file' if len(paths) == 1 else 'these input files'}"
            f" (expected {what}); fix or remove {'it' if len(paths) == 1 else 'them'} (--input)")


def _check_job(out_dir: Path, job: ShardJob) -> None:
    """Record the job in a fresh folder; refuse a folder that an earlier run filled with other settings."""
    progress = out_dir / PROGRESS_DIR
    progress.mkdir(parents=True, exist_ok=True)
    wanted = json.dumps(asdict(job), indent=1, sort_keys=True)
    recorded = progress / JOB_FILE
    if recorded.exists():
        earlier = json.loads(recorded.read_text())
        differ = sorted(k for k, v in json.loads(wanted).items() if earlier.get(k) != v and k != "tokenizer_path")
        if differ:
            changed = "; an input file changed size since that run" if "input_sizes" in differ else ""
            raise TokenizationError(f"{out_dir}: holds shards made with other settings ({', '.join(differ)} differ"
                                    f"{changed}); use a fresh output folder or the same settings and inputs")
        return
    if not fmt.create_once(recorded, wanted.encode()):
        _check_job(out_dir, job)  # another run (a job array's task) recorded its job first: compare with it


def missing_parts(out_dir: str | Path, count: int) -> int:
    """How many of the first `count` parts have no done record in `out_dir` yet."""
    return sum(1 for i in range(count) if _done_record(Path(out_dir), i) is None)


def _done_record(out_dir: Path, index: int) -> dict | None:
    path = out_dir / PROGRESS_DIR / f"{index:05d}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _exit_when_orphaned(parent: int) -> None:
    """A worker whose parent was killed stops at once, so it cannot race a rerun in the same folder."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _init_worker(progress_queue, parent: int) -> None:
    global _REPORT
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    if progress_queue is not None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
        _REPORT = lambda docs, tokens: progress_queue.put((docs, tokens))  # noqa: E731


def _run_parts(job: ShardJob, out_dir: Path, todo: list[tuple[int, Part]], workers: int, bar) -> list[dict]:
    global _REPORT
    if workers <= 1 or len(todo) <= 1:
        _REPORT = lambda docs, tokens: bar.update_counts(docs, tokens)  # noqa: E731
        try:
            return [process_part(job, out_dir, i, part) for i, part in todo]
        finally:
            _REPORT = None
    # fork: workers start at once and need no importable __main__; `tokenizers` notices the fork and turns
    # its own thread pool off in the children, which is what one process per core wants anyway
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    progress_queue = ctx.Queue()
    # ProcessPoolExecutor, not Pool: a worker that dies (OOM kill) fails the run instead of hanging it
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                             initargs=(progress_queue, os.getpid())) as pool:
        futures = [pool.submit(process_part, job, str(out_dir), i, part) for i, part in todo]
        while not all(f.done() for f in futures):
            try:
                bar.update_counts(*progress_queue.get(timeout=0.2))
            except queue_lib.Empty:
                pass
            if any(f.done() and f.exception() is not None for f in futures):
                for f in futures:
                    f.cancel()
                break
        failed = [f.exception() for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
        if failed:
            raise failed[0]
        return [f.result() for f in futures]


class _Progress:
    """A tqdm bar over tokens with the document count beside it (tokens/s is tqdm's rate)."""

    def __init__(self, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(unit="tok", unit_scale=True, desc="tokenize", disable=not enabled)
        self.documents = 0

    def update_counts(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.bar.update(tokens)
        self.bar.set_postfix(documents=self.documents, refresh=False)

    def close(self) -> None:
        self.bar.close()


def shard_corpus(inputs: Sequence[str], tokenizer_path: str | Path, out_dir: str | Path, *, seq_len: int,
                 packing: str = "concat", text_field: str = "text", txt_mode: str = "file",
                 eos_token: str = DEFAULT_EOS, workers: int = 1, shard_max_bytes: int = 1 << 30,
                 shard_max_samples: int = 100_000, command: str = "", progress: bool = True,
                 part_range: tuple[int, int] | None = None,
                 split_bytes: int = DEFAULT_SPLIT_BYTES) -> fmt.Manifest | None:
    """Tokenize `inputs` (paths or globs) into a token-shard folder; finishes what an earlier run left.

    The inputs are cut into parts (`corpus_parts`: a plain .jsonl file larger than `split_bytes` > 0 becomes
    several). With `part_range=(start, stop)` only the parts start ≤ i < stop are processed; stop is clipped to
    the part count and an empty range processes nothing. Returns the manifest, written once every part of the
    folder is done, or None while parts outside the range are still missing.
    """
    if packing not in fmt.PACKING_MODES:
        raise TokenizationError(f"packing: expected one of {fmt.PACKING_MODES}, got {packing!r}")
    if seq_len < 1 or shard_max_bytes < 1 or shard_max_samples < 1:
        raise TokenizationError("seq_len, shard_max_bytes and shard_max_samples must be ≥ 1")
    if part_range is not None and not 0 <= part_range[0] <= part_range[1]:
        raise TokenizationError(f"part range {part_range[0]}:{part_range[1]}: expected 0 ≤ START ≤ STOP")
    files, sizes, parts = corpus_parts(inputs, split_bytes)
    empty = [f for f, size in zip(files, sizes) if size == 0]
    if empty:
        raise TokenizationError(f"{', '.join(empty)}: empty input file{'s' if len(empty) > 1 else ''}; expected "
                                f"text in every input file, nothing was written (fix or remove them: --input)")
    start, stop = (0, len(parts)) if part_range is None else (part_range[0], min(part_range[1], len(parts)))
    tok = load_tokenizer(tokenizer_path)
    job = ShardJob(files, str(tokenizer_path), fingerprint(tok), seq_len, packing, text_field, txt_mode,
                   eos_token, shard_max_bytes, shard_max_samples, sizes, split_bytes)
    out = Path(out_dir)
    _check_job(out, job)
    todo = [(i, parts[i]) for i in range(start, stop) if _done_record(out, i) is None]
    bar = _Progress(progress)
    try:
        _run_parts(job, out, todo, workers, bar)
    finally:
        bar.close()
    records = [_done_record(out, i) for i in range(len(parts))]
    if any(r is None for r in records):
        return None  # other ranges (job array tasks) still have parts to do; the last one writes the manifest
    manifest = _manifest(job, out, parts, records, eos_id(tok, eos_token), vocab_size(tok), command)
    fmt.write_manifest(out, manifest)
    return manifest


def _manifest(job: ShardJob, out: Path, parts: list[Part], records: list[dict], eos: int, vocab: int,
              command: str) -> fmt.Manifest:
    """The folder's manifest from every part's done record; an error if an input or the whole corpus is empty."""
    documents = [0] * len(job.inputs)
    for part, record in zip(parts, records):
        documents[part.file] += record["documents"]
    empty = [path for path, count in zip(job.inputs, documents) if count == 0]
    if empty:  # a split file whose parts all came out empty (a whole file fails in its own part)
        raise TokenizationError(_no_documents(job, empty) + f"; no manifest was written in {out}")
    shards = tuple(fmt.ShardEntry(**entry) for r in records for entry in r["shards"])
    if not shards:
        tokens = sum(r["tokens"] for r in records)
        raise TokenizationError(f"{out}: the input holds {tokens} tokens, too few for one sample of seq_len + 1 = "
                                f"{job.seq_len + 1} tokens (concat packing drops each part's tail); give more "
                                f"text, a smaller --seq-len or --packing bestfit; no manifest was written")
    extra = {"inputs": list(job.inputs), "documents": sum(documents),
             "dropped_tokens": sum(r["dropped_tokens"] for r in records), "text_field": job.text_field,
             "txt_mode": job.txt_mode, "eos_token": job.eos_token, "split_bytes": job.split_bytes}
    return fmt.Manifest(job.tokenizer_fingerprint, vocab, eos, job.seq_len, job.packing, shards, command, extra=extra)

"""Write token shards: tokenize, pack and store each input file as webdataset shards, then the manifest.

Design choice: the unit of work is one input file. File `i` is tokenized and packed on its own into
shards `{i:05d}-{j:05d}.tar.gz` with keys `{i:05d}-{sample:09d}`, so workers process files in parallel
without talking to each other, keys never depend on scheduling, and a rerun after a kill redoes only the
files without a done record (`_progress/{i:05d}.json`, written atomically after the file's shards). Each
shard is written under a temporary name, fsynced and renamed. The cost: packing restarts at every file,
so in concat mode each file drops its tail (< seq_len + 1 tokens; counted in the manifest's
`extra.dropped_tokens`), and one huge file is processed by a single worker.

Workers are forked processes under a ProcessPoolExecutor (a dead worker fails the run rather than
hanging it); each exits by itself when its parent is killed, so it cannot race a rerun in the folder.
`_progress/job.json` records the settings; a rerun with other settings in the same folder is refused.

A run may take only files START ≤ i < STOP (`file_range`, a Slurm job array's slice). Array tasks share
one folder: their files, shards and done records never collide, job.json is created once with a hard
link (the first task's settings win, a task with other settings is refused), and the manifest is written
by whichever run finds every file done; a run that leaves files missing writes none and returns None.
The cost: nothing waits for the other tasks, so the folder has no manifest until the last range is done
(rerunning any range, even an empty one, writes it if every file is done).

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
from tokenization.readers import expand_inputs, iter_documents
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
    format_version: int = fmt.FORMAT_VERSION  # a folder written by another format version is refused, not mixed


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


def _clear_file_outputs(out_dir: Path, file_index: int) -> None:
    """Delete whatever an unfinished earlier attempt left for this input file."""
    stale_names = (f"{file_index:05d}-*{fmt.SHARD_SUFFIX}", f".{file_index:05d}-*{fmt.SHARD_SUFFIX}.tmp")
    for stale in [path for pattern in stale_names for path in out_dir.glob(pattern)]:
        stale.unlink()


_TOKENIZERS: dict = {}
_REPORT: Callable[[int, int], None] | None = None


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


def _encoded_documents(job: ShardJob, path: str, dtype: np.dtype, eos: int, counts: dict):
    """Each non-empty document of `path` as ids + EOS; documents and tokens counted into `counts`."""
    tok = _tokenizer(job.tokenizer_path)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    batch: list[str] = []
    docs = iter_documents(path, text_field=job.text_field, txt_mode=job.txt_mode)
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


def process_file(job: ShardJob, out_dir: str | Path, file_index: int) -> dict:
    """Tokenize, pack and write one input file's shards, then its done record; returns the record."""
    out_dir = Path(out_dir)
    _clear_file_outputs(out_dir, file_index)
    path = job.inputs[file_index]
    tok = _tokenizer(job.tokenizer_path)
    dtype, eos = fmt.token_dtype(vocab_size(tok)), eos_id(tok, job.eos_token)
    counts = {"documents": 0, "tokens": 0}
    docs = _encoded_documents(job, path, dtype, eos, counts)
    sink = _ShardSink(out_dir, file_index, job.shard_max_bytes, job.shard_max_samples)
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
    record = {"input": path, "documents": counts["documents"], "tokens": counts["tokens"],
              "dropped_tokens": dropped, "shards": [asdict(e) for e in sink.close()]}
    fmt.write_atomic(out_dir / PROGRESS_DIR / f"{file_index:05d}.json", json.dumps(record, indent=1).encode())
    return record


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
            raise TokenizationError(f"{out_dir}: holds shards made with other settings ({', '.join(differ)} differ); "
                                    f"use a fresh output folder or the same settings")
        return
    if not _create_once(recorded, wanted.encode()):
        _check_job(out_dir, job)  # another run (a job array's task) recorded its job first: compare with it


def _create_once(path: Path, data: bytes) -> bool:
    """Create `path` whole with `data` unless it exists; False if another process created it first.

    The file is written under a private name, then hard-linked into place: the link fails if the name exists,
    so concurrent runs cannot both think they recorded the job. Where hard links are unsupported, falls back
    to an atomic replace (the last writer wins; concurrent runs with different settings are then not caught).
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        created = True
    except FileExistsError:
        created = False
    except OSError:  # no hard links on this file system
        os.replace(tmp, path)
        created = True
    finally:
        tmp.unlink(missing_ok=True)
    if created:
        fmt.fsync_dir(path.parent)
    return created


def missing_files(out_dir: str | Path, count: int) -> int:
    """How many of the first `count` input files have no done record in `out_dir` yet."""
    return sum(1 for i in range(count) if _done_record(Path(out_dir), i) is None)


def _done_record(out_dir: Path, file_index: int) -> dict | None:
    path = out_dir / PROGRESS_DIR / f"{file_index:05d}.json"
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


def _run_files(job: ShardJob, out_dir: Path, todo: list[int], workers: int, bar) -> list[dict]:
    global _REPORT
    if workers <= 1 or len(todo) <= 1:
        _REPORT = lambda docs, tokens: bar.update_counts(docs, tokens)  # noqa: E731
        try:
            return [process_file(job, out_dir, i) for i in todo]
        finally:
            _REPORT = None
    # fork: workers start at once and need no importable __main__; `tokenizers` notices the fork and turns
    # its own thread pool off in the children, which is what one process per core wants anyway
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    progress_queue = ctx.Queue()
    # ProcessPoolExecutor, not Pool: a worker that dies (OOM kill) fails the run instead of hanging it
    with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=_init_worker,
                             initargs=(progress_queue, os.getpid())) as pool:
        futures = [pool.submit(process_file, job, str(out_dir), i) for i in todo]
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
                 file_range: tuple[int, int] | None = None) -> fmt.Manifest | None:
    """Tokenize `inputs` (paths or globs) into a token-shard folder; finishes what an earlier run left.

    With `file_range=(start, stop)` only the (sorted, expanded) files start ≤ i < stop are processed; stop is
    clipped to the file count and an empty range processes nothing. Returns the manifest, written once every
    file of the folder is done, or None while files outside the range are still missing.
    """
    if packing not in fmt.PACKING_MODES:
        raise TokenizationError(f"packing: expected one of {fmt.PACKING_MODES}, got {packing!r}")
    if seq_len < 1 or shard_max_bytes < 1 or shard_max_samples < 1:
        raise TokenizationError("seq_len, shard_max_bytes and shard_max_samples must be ≥ 1")
    if file_range is not None:
        start, stop = file_range
        if start < 0 or stop < start:
            raise TokenizationError(f"file range {start}:{stop}: expected 0 ≤ START ≤ STOP")
    files = tuple(expand_inputs(list(inputs)))
    start, stop = (0, len(files)) if file_range is None else (file_range[0], min(file_range[1], len(files)))
    tok = load_tokenizer(tokenizer_path)
    eos, vocab = eos_id(tok, eos_token), vocab_size(tok)
    job = ShardJob(files, str(tokenizer_path), fingerprint(tok), seq_len, packing, text_field, txt_mode,
                   eos_token, shard_max_bytes, shard_max_samples)
    out = Path(out_dir)
    _check_job(out, job)
    todo = [i for i in range(start, stop) if _done_record(out, i) is None]
    bar = _Progress(progress)
    try:
        _run_files(job, out, todo, workers, bar)
    finally:
        bar.close()
    records = [_done_record(out, i) for i in range(len(files))]
    if any(r is None for r in records):
        return None  # other ranges (job array tasks) still have files to do; the last one writes the manifest
    shards = tuple(fmt.ShardEntry(**entry) for r in records for entry in r["shards"])
    extra = {"inputs": list(files), "documents": sum(r["documents"] for r in records),
             "dropped_tokens": sum(r["dropped_tokens"] for r in records), "text_field": text_field,
             "txt_mode": txt_mode, "eos_token": eos_token}
    manifest = fmt.Manifest(job.tokenizer_fingerprint, vocab, eos, seq_len, packing, shards, command, extra=extra)
    fmt.write_manifest(out, manifest)
    return manifest

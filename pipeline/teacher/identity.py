"""Who made a cache: the teacher's identity, the job settings that decide the bytes, and the checks that
keep one output folder for one job.

A cache folder is bound to one job the first time it is used: `_progress/job.json` records the teacher
(its model config and the sha256 of its weight files), the token shards' fingerprint, the target
settings, the seed and the compute settings that change the logits (dtype, document masking), and for
teacher-sampled prefixes the prefix settings (prompt length, loss mask, sampling). The
record is created once, never replaced: of concurrent tasks on one folder (a job array's), the first
to record its job wins and every other is compared with it (where the file system has hard links; see
`tokenization.format.create_once`). A rerun or another task with the same
record completes the missing shards; any difference is refused before anything is written, naming the
fields that differ. The teacher's tokenizer, when its folder has one, must be the
token shards' tokenizer.

Design choice: the weights are identified by hashing every weight file in full, so a retrained teacher
with the same config is caught; the cost is one read of the teacher per job start (about a second per
GB), shown as a progress bar.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tqdm import tqdm

from pipeline.teacher.errors import CacheError
from tokenization.format import Manifest, create_once

PROGRESS_DIR = "_progress"
JOB_FILE = "job.json"
WEIGHT_SUFFIXES = (".safetensors",)


def weights_sha256(folder: str | Path, *, progress: bool = False) -> str:
    """sha256 over the names and contents of the folder's weight files, in name order."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise CacheError(f"teacher {folder}: no *.safetensors weight files to identify the teacher by")
    digest = hashlib.sha256()
    with tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True, desc="hashing teacher",
              disable=not progress, leave=False) as bar:
        for path in files:
            digest.update(f"{path.name}\0".encode())
            with open(path, "rb") as stream:
                while chunk := stream.read(16 << 20):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


def check_teacher_tokenizer(teacher: str | Path, tokens: Manifest, where: str) -> bool:
    """True when the teacher folder has a tokenizer and it is the token shards'; refused when it differs.
    False when the folder has none (nothing to compare; the vocabulary sizes are still checked)."""
    from tokenization.tokenizer import TOKENIZER_FILE, fingerprint, load_tokenizer

    if not (Path(teacher) / TOKENIZER_FILE).is_file():
        return False
    found = fingerprint(load_tokenizer(teacher))
    if found != tokens.tokenizer_fingerprint:
        raise CacheError(f"teacher {teacher}: its tokenizer (fingerprint {found[:12]}…) is not the one the token "
                         f"shards in {where} were made with ({tokens.tokenizer_fingerprint[:12]}…); the teacher "
                         f"must read the token ids it was trained on")
    return True


def check_vocabulary(teacher_vocab: int, tokens: Manifest, where: str) -> None:
    if tokens.vocab_size > teacher_vocab:
        raise CacheError(f"token shards {where}: vocab_size {tokens.vocab_size} exceeds the teacher's vocab_size "
                         f"{teacher_vocab}; the shards were made with another tokenizer")


def bind_output(output: str | Path, record: dict) -> None:
    """Record the job in a fresh output folder, or check a used folder was made by the same job.

    The record is created once (`tokenization.format.create_once`): of concurrent tasks starting on one
    fresh folder (a job array's), exactly one records its job and every other compares with it."""
    folder = Path(output)
    recorded = folder / PROGRESS_DIR / JOB_FILE
    if not recorded.exists():
        # checked again after listing: a concurrent task records its job before it writes anything else
        if folder.exists() and any(p.name != PROGRESS_DIR for p in folder.iterdir()) and not recorded.exists():
            raise CacheError(f"{folder}: exists and is not a cache folder of this pipeline (no {PROGRESS_DIR}/"
                             f"{JOB_FILE}); refusing to write into it")
        recorded.parent.mkdir(parents=True, exist_ok=True)
        if create_once(recorded, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()):
            return
    _check_same_job(folder, recorded, record)


def _check_same_job(folder: Path, recorded: Path, record: dict) -> None:
    try:
        earlier = json.loads(recorded.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{recorded}: not valid JSON ({err}); remove the folder or choose another") from None
    differ = sorted(set(_flatten(earlier).items()) ^ set(_flatten(record).items()))
    if differ:
        names = sorted({name for name, _ in differ})
        raise CacheError(f"{folder}: holds a cache made by a different teacher or settings ({', '.join(names)} "
                         f"differ); nothing was overwritten. Use a fresh output folder or the same job")


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(value, sort_keys=True)}

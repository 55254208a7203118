"""What a run checks before it builds anything, and the identity its checkpoints carry.

`check_settings` refuses combinations that would fail later or train the wrong thing, each with the
setting to change: no teacher but a divergence that needs one, sampled targets with a divergence that
is not linear in the teacher's probabilities, a temperature other than the cache's, a vocabulary the
student cannot score. `run_identity` is what a checkpoint must share with the run that resumes it:
not the layout (dp, tp and grad_accumulation may change, see reshard.py), but the micro-batch and
the global batch.

Design choice: these checks read manifests only (no shard, no model), so a wrong config fails in a
second, on every rank alike, before any process group waits; the cost is that a cache whose shards
are damaged is found later, by the reader, with its own message.
"""
from __future__ import annotations

import json

from pipeline.config import TrainConfig, config_to_dict
from pipeline.data.sources import ShardSet
from pipeline.model.builder import compute_dtype
from pipeline.parallel import ParallelContext
from pipeline.train.errors import TrainError

SAMPLED_DIVERGENCES = ("kl", "ce")


def check_settings(cfg: TrainConfig) -> None:
    """A TrainError naming the setting when the config cannot train as written."""
    for key, value in (("run_dir", cfg.run_dir), ("data.tokens", cfg.data.tokens)):
        if not value:
            raise TrainError(f"{key}: is required; set it in the config or as an override ({key}=PATH)")
    if not cfg.data.teacher_cache and cfg.loss.divergence != "ce":
        raise TrainError(f"loss.divergence={cfg.loss.divergence!r} needs a teacher, but data.teacher_cache is empty; "
                         "set data.teacher_cache to a cache from `distill cache`, or loss.divergence=ce for plain "
                         "next-token training")
    if cfg.data.eval_teacher_cache and not cfg.data.eval_tokens:
        raise TrainError("data.eval_teacher_cache is set but data.eval_tokens is empty; set both or neither")
    if cfg.eval.teacher and not cfg.data.eval_tokens:
        raise TrainError("eval.teacher is set (risks) but data.eval_tokens is empty; the risks' prompts come from "
                         "the held-out shards: set data.eval_tokens, or leave eval.teacher empty")
    tokens = ShardSet(cfg.data.tokens).manifest
    if tokens.vocab_size > cfg.model.vocab_size:
        raise TrainError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of the token shards "
                         f"in {cfg.data.tokens} ({tokens.vocab_size}); set model.vocab_size to at least that")
    for cache, trained_on in ((cfg.data.teacher_cache, True), (cfg.data.eval_teacher_cache, False)):
        if cache:
            _check_cache(cfg, cache, trained_on=trained_on)
    if cfg.data.tokenizer:
        _check_tokenizer(cfg.data.tokenizer, tokens.tokenizer_fingerprint, cfg.data.tokens)


def _check_cache(cfg: TrainConfig, cache: str, *, trained_on: bool) -> None:
    """A cache the student can score; the loss's own demands (mode, temperature) only for the one it trains on.

    The held-out cache is eval's ruler, the same for every run: eval measures KL at that cache's temperature
    whatever the training loss, so a run at loss.temperature=2 is still evaluated on T=1 targets."""
    from pipeline.teacher.reader import CacheTargets

    targets = CacheTargets(cache)
    mode = targets.record.get("mode")
    if trained_on and mode == "sampled" and cfg.loss.divergence not in SAMPLED_DIVERGENCES:
        raise TrainError(f"loss.divergence={cfg.loss.divergence!r} with the sampled cache {cache}: counts/N is an "
                         "unbiased teacher only inside losses linear in it; use loss.divergence=kl (or a top-K cache "
                         "for rkl, js, tvd and the skewed ones)")
    if trained_on and abs(targets.temperature - cfg.loss.temperature) > 1e-12:
        raise TrainError(f"loss.temperature={cfg.loss.temperature} but the cache {cache} was written at temperature "
                         f"{targets.temperature}; set loss.temperature={targets.temperature} or remake the cache")
    if targets.vocab_size > cfg.model.vocab_size:
        raise TrainError(f"the teacher of {cache} scores {targets.vocab_size} ids but model.vocab_size is "
                         f"{cfg.model.vocab_size}; its targets could name ids the student cannot score. Set "
                         f"model.vocab_size to at least {targets.vocab_size}")


def _check_tokenizer(path: str, expected: str, tokens: str) -> None:
    from tokenization.tokenizer import fingerprint, load_tokenizer

    found = fingerprint(load_tokenizer(path))
    if found != expected:
        raise TrainError(f"data.tokenizer={path}: fingerprint {found[:12]}… is not the one the token shards in "
                         f"{tokens} were made with ({expected[:12]}…)")


def open_teacher(cfg: TrainConfig, cache: str):
    """The cache's target decoder, or None without a teacher."""
    if not cache:
        return None
    from pipeline.teacher.reader import CacheTargets
    from pipeline.train.stream import TEACHER

    return CacheTargets(cache, prefix=TEACHER, sparse_mode=cfg.loss.target_mode)


def global_batch(micro_batch: int, grad_accumulation: int, dp: int) -> dict:
    """The batch shape a resumed run must keep: the layout (dp, tp) may change, the samples per step may not."""
    return {"micro_batch": micro_batch, "global_batch": micro_batch * grad_accumulation * dp}


def run_identity(cfg: TrainConfig, ctx: ParallelContext, stream, teacher) -> dict:
    """What a checkpoint must share with the run that resumes it (JSON-plain, compared key by key)."""
    tokens = ShardSet(cfg.data.tokens)
    identity = {
        "model": config_to_dict(cfg.model.architecture_config()),  # not model.init: a resumed run ignores it
        "compute": {"dtype": str(compute_dtype(cfg.compute, ctx.device)),
                    "document_masking": cfg.compute.document_masking, "vocab_multiple": cfg.compute.vocab_multiple},
        "tokenizer": tokens.manifest.tokenizer_fingerprint,
        "data": stream.datasets[0].fingerprint,
        "teacher_cache": None if teacher is None else ShardSet(teacher.location).fingerprint(),
        "loss": config_to_dict(cfg.loss),
        "batch": global_batch(cfg.schedule.micro_batch, cfg.schedule.grad_accumulation, ctx.dp_size),
        "seed": cfg.seed,
    }
    return json.loads(json.dumps(identity))

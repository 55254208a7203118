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
    _check_teacher(cfg)
    if cfg.data.eval_teacher_cache and not cfg.data.eval_tokens:
        raise TrainError("data.eval_teacher_cache is set but data.eval_tokens is empty; set both or neither")
    if cfg.eval.teacher and not cfg.data.eval_tokens:
        raise TrainError("eval.teacher is set (risks) but data.eval_tokens is empty; the risks' prompts come from "
                         "the held-out shards: set data.eval_tokens, or leave eval.teacher empty")
    tokens = ShardSet(cfg.data.tokens).manifest
    for key, prefixes in _prefix_settings(cfg):
        if prefixes.generates and not 1 <= prefixes.prompt_len <= tokens.seq_len:
            raise TrainError(f"{key}.prompt_len={prefixes.prompt_len} leaves no token to generate: the samples of "
                             f"{cfg.data.tokens} hold seq_len + 1 = {tokens.seq_len + 1} tokens; expected "
                             f"1 ≤ prompt_len ≤ {tokens.seq_len}")
    if tokens.vocab_size > cfg.model.vocab_size:
        raise TrainError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the vocabulary of the token shards "
                         f"in {cfg.data.tokens} ({tokens.vocab_size}); set model.vocab_size to at least that")
    for cache, trained_on in ((cfg.data.teacher_cache, True), (cfg.data.eval_teacher_cache, False)):
        if cache:
            _check_cache(cfg, cache, trained_on=trained_on)
    if cfg.data.tokenizer:
        _check_tokenizer(cfg.data.tokenizer, tokens.tokenizer_fingerprint, cfg.data.tokens)
    if cfg.teacher.online:
        _check_online_tokenizer(cfg.teacher.online, tokens, cfg.data.tokens)


def _prefix_settings(cfg: TrainConfig) -> list:
    return [("loss.prefixes", cfg.loss.prefixes)] + [(f"loss.phases[{i}].prefixes", phase.prefixes)
                                                     for i, phase in enumerate(cfg.loss.phases)]


def _check_teacher(cfg: TrainConfig) -> None:
    """A teacher wherever the loss or the prefixes need one, and never two."""
    if cfg.teacher.online and cfg.data.teacher_cache:
        raise TrainError(f"teacher.online={cfg.teacher.online} and data.teacher_cache={cfg.data.teacher_cache} are "
                         "both set; a run learns from one teacher: the online model's dense logits, or the cache's "
                         "sparse targets. Empty one of them")
    divergences = {cfg.loss.divergence, *(p.divergence for p in cfg.loss.phases if p.divergence)}
    if cfg.loss.kl_warmup_steps:
        divergences.add("kl")
    if not (cfg.teacher.online or cfg.data.teacher_cache) and divergences - {"ce"}:
        wanted = sorted(divergences - {"ce"})
        raise TrainError(f"loss.divergence={wanted[0]!r} needs a teacher, but data.teacher_cache and teacher.online "
                         "are empty; set data.teacher_cache to a cache from `distill cache`, teacher.online to a "
                         "teacher model, or loss.divergence=ce for plain next-token training")
    for key, prefixes in _prefix_settings(cfg):
        if prefixes.generates and not cfg.teacher.online:
            raise TrainError(f"{key}: teacher={prefixes.teacher}, student={prefixes.student} generate prefixes, "
                             "which only an online teacher can continue and score; set teacher.online to the "
                             "teacher model (or train on the offline teacher-sampled shards of `distill cache` "
                             "with prefixes.source=teacher as data.tokens)")
    if cfg.teacher.hidden_weight and not cfg.teacher.online:
        raise TrainError("teacher.hidden_weight needs teacher.online: the hidden states come from the online "
                         "teacher's forward")


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


def _check_online_tokenizer(teacher: str, tokens, where: str) -> None:
    """The online teacher's tokenizer, when its folder has one, is the token shards' (as for a cache's
    teacher); its vocabulary is checked against model.vocab_size when it is loaded."""
    from pipeline.teacher.errors import CacheError
    from pipeline.teacher.identity import check_teacher_tokenizer

    try:
        check_teacher_tokenizer(teacher, tokens, where)
    except CacheError as err:
        raise TrainError(f"teacher.online: {err}") from None


def open_teacher(cfg: TrainConfig, ctx: ParallelContext):
    """The targets' source: the online teacher (teacher.online), the cache's target decoder
    (data.teacher_cache), or None without a teacher."""
    if cfg.teacher.online:
        from pipeline.online.teacher import OnlineTeacher

        return OnlineTeacher(cfg, ctx)
    if not cfg.data.teacher_cache:
        return None
    from pipeline.teacher.reader import CacheTargets
    from pipeline.train.stream import TEACHER

    return CacheTargets(cfg.data.teacher_cache, prefix=TEACHER, sparse_mode=cfg.loss.target_mode)


def prefix_sampler(cfg: TrainConfig, ctx: ParallelContext, teacher):
    """The `PrefixSampler` that continues rows with the online teacher or the student, or None when every
    prefix comes from the data (no source of loss.prefixes or of a phase generates)."""
    if not any(p.generates for p in cfg.loss.all_prefixes):
        return None
    from pipeline.online.prefixes import PrefixSampler

    manifest = ShardSet(cfg.data.tokens).manifest
    return PrefixSampler(teacher_model=teacher.model, vocab_size=cfg.model.vocab_size, eos_id=manifest.eos_id,
                         seq_len=manifest.seq_len, seed=cfg.seed, tp_group=ctx.tp_group)


def global_batch(micro_batch: int, grad_accumulation: int, dp: int) -> dict:
    """The batch shape a resumed run must keep: the layout (dp, tp) may change, the samples per step may not."""
    return {"micro_batch": micro_batch, "global_batch": micro_batch * grad_accumulation * dp}


def run_identity(cfg: TrainConfig, ctx: ParallelContext, stream, teacher) -> dict:
    """What a checkpoint must share with the run that resumes it (JSON-plain, compared key by key)."""
    from pipeline.online.hidden import map_shape

    tokens = ShardSet(cfg.data.tokens)
    identity = {
        "model": config_to_dict(cfg.model.architecture_config()),  # not model.init: a resumed run ignores it
        "compute": {"dtype": str(compute_dtype(cfg.compute, ctx.device)),
                    "document_masking": cfg.compute.document_masking, "vocab_multiple": cfg.compute.vocab_multiple},
        "tokenizer": tokens.manifest.tokenizer_fingerprint,
        "data": stream.datasets[0].fingerprint,
        "teacher_cache": ShardSet(cfg.data.teacher_cache).fingerprint() if cfg.data.teacher_cache else None,
        "teacher_online": cfg.teacher.online or None,
        "hidden_map": map_shape(cfg),  # a checkpoint holds the intermediate-state loss's map, or none
        "loss": config_to_dict(cfg.loss),
        "batch": global_batch(cfg.schedule.micro_batch, cfg.schedule.grad_accumulation, ctx.dp_size),
        "seed": cfg.seed,
    }
    return json.loads(json.dumps(identity))

"""The cache job: a TP teacher reads token shards and writes one cache shard per token shard.

Every process of `world = dp × tp` loads its TP slice of the teacher. The shards still missing (no done
record) are dealt out to the dp replicas round robin; the tp ranks of a replica read the same samples,
run the teacher, and compute the targets together from their vocabulary slices (collectives, so every tp
rank holds the same targets); only the replica's tp rank 0 then encodes and writes them, the other tp
ranks go on to the next micro-batch. The summary's `samples_encoded` counts this process's encodes (tp
rank 0: its replica's samples; other tp ranks: 0). Samples' keys are the token shard's keys, in the same
order. When every shard has its record, the manifest is written and the folder becomes a cache the
student's reader accepts.
With `prefixes.source: teacher` the prefixes are the teacher's own continuations of each sample's prompt,
written as token shards beside the cache in the same pass (`sampled_prefixes.py`, a subclass of this job).

Design choice: shards, not samples, are the unit of work and of restart: a shard is done or it is not,
so a killed job loses at most one shard per replica and its rerun writes byte-identical shards. The
cost is that a replica's last shard bounds the job's tail; many small shards balance better.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.config import CacheConfig, ConfigError, config_to_dict
from pipeline.data.dataset import collate
from pipeline.data.shards import ShardReader, verify_shard
from pipeline.data.sources import ShardSet
from pipeline.model.builder import compute_dtype
from pipeline.parallel import ParallelContext
from pipeline.teacher.errors import CacheError
from pipeline.teacher.format import codec_of, encode_record, target_positions, targets_record
from pipeline.teacher.identity import bind_output, check_teacher_tokenizer, check_vocabulary, weights_sha256
from pipeline.teacher.targets import sampled_targets, topk_targets
from pipeline.teacher.writer import CacheShardWriter, ShardRecord, write_cache_manifest
from tokenization.format import ShardEntry, decode_sample


@dataclass
class Teacher:
    """The loaded teacher and what the job derives from it."""

    model: torch.nn.Module
    vocab_size: int
    identity: dict


def require_paths(cfg: CacheConfig) -> None:
    for name in ("teacher", "tokens", "output"):
        if not getattr(cfg, name):
            raise ConfigError(name, "is required: set it in the config or as an override, e.g. "
                                    f"{name}=/path/to/{'folder' if name != 'teacher' else 'teacher'}")


def run_cache(cfg: CacheConfig, *, shard_range: tuple[int, int] | None = None) -> dict:
    """Run the job in this process (one of world = dp × tp); returns the summary."""
    require_paths(cfg)
    ctx = ParallelContext.from_env(cfg.parallel.tp, cfg.parallel.backend, cfg.parallel.timeout_minutes)
    try:
        if cfg.prefixes.source == "teacher":
            from pipeline.teacher.sampled_prefixes import SampledPrefixJob

            return SampledPrefixJob(cfg, ctx, shard_range).run()
        return CacheJob(cfg, ctx, shard_range).run()
    finally:
        ctx.destroy()


def on_first_rank(ctx: ParallelContext, action):
    """Run `action()` on global rank 0 only and return its result everywhere. Its error is raised on rank 0
    as it was and on every other rank as a CacheError with the same message, so no rank waits forever."""
    outcome, failure = [None, None], None
    if ctx.rank == 0:
        try:
            outcome[0] = action()
        except Exception as err:  # noqa: BLE001 - every failure must reach the other ranks
            failure, outcome[1] = err, f"{type(err).__name__}: {err}" if isinstance(err, OSError) else str(err)
    if ctx.world_size > 1:
        dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        raise CacheError(outcome[1])
    return outcome[0]


def key_uniforms(seed: int, key: str, positions: int, draws: int) -> torch.Tensor:
    """[positions, draws] float64 uniforms seeded by (seed, key): the same on every rank and every rerun."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.rand(positions, draws, generator=generator, dtype=torch.float64)


class CacheJob:
    """One process's part of the job; see the module docstring."""

    def __init__(self, cfg: CacheConfig, ctx: ParallelContext, shard_range: tuple[int, int] | None):
        self.cfg, self.ctx = cfg, ctx
        self.tokens = ShardSet(cfg.tokens)
        self._check_settings()
        self.range = self._check_range(shard_range)
        self.teacher = self._load_teacher()
        self.record = targets_record(cfg.targets, self.teacher.vocab_size, self.tokens.manifest.seq_len)
        self.codec = codec_of(self.record)
        self.samples_encoded = 0  # this process's codec encodes: only a replica's writing rank makes any
        self.job = self._job_record()
        on_first_rank(ctx, lambda: bind_output(cfg.output, self.job))

    def _check_settings(self) -> None:
        """Settings checked against the token manifest before any work (none for corpus prefixes)."""

    def _job_record(self) -> dict:
        """What decides the bytes (identity.py): recorded in the output folder, refused when it differs."""
        cfg = self.cfg
        return {"teacher": self.teacher.identity, "tokens": self.tokens.fingerprint(), "targets": self.record,
                "seed": cfg.seed if cfg.targets.mode == "sampled" else None,
                "compute": {"dtype": str(compute_dtype(cfg.compute, self.ctx.device)),
                            "document_masking": cfg.compute.document_masking}}

    def _check_range(self, shard_range):
        count = len(self.tokens.manifest.shards)
        start, stop = shard_range or (0, count)
        if not 0 <= start < stop <= count:
            raise CacheError(f"shard range {start}:{stop} is outside the {count} token shards of {self.cfg.tokens}")
        return start, stop

    def _load_teacher(self) -> Teacher:
        from pipeline.model import load_model

        manifest, cfg = self.tokens.manifest, self.cfg
        model = load_model(cfg.teacher, self.ctx, cfg.compute).eval()
        vocab = model.model_config.vocab_size
        check_vocabulary(vocab, manifest, cfg.tokens)
        on_first_rank(self.ctx, lambda: check_teacher_tokenizer(cfg.teacher, manifest, cfg.tokens))
        weights = on_first_rank(self.ctx, lambda: weights_sha256(cfg.teacher, progress=cfg.progress))
        identity = {"model": config_to_dict(model.model_config), "weights_sha256": weights}
        return Teacher(model, vocab, identity)

    # ---- the work

    def run(self) -> dict:
        todo = on_first_rank(self.ctx, self._missing)
        mine = todo[self.ctx.dp_rank:: self.ctx.dp_size]
        started, written = time.perf_counter(), []
        bar = self._progress_bar(mine)
        try:
            for index in mine:
                written.append(self._cache_shard(index, bar))
        finally:
            bar.close()
        elapsed = time.perf_counter() - started
        if self.ctx.world_size > 1:
            dist.barrier()
        manifest = on_first_rank(self.ctx, self._finish)
        return self._summary(todo, written, elapsed, manifest)

    def _missing(self) -> list[int]:
        names = [s.name for s in self.tokens.manifest.shards]
        return [i for i in range(*self.range) if ShardRecord.read(Path(self.cfg.output), names[i]) is None]

    def _progress_bar(self, mine: list[int]):
        total = sum(self.tokens.manifest.shards[i].samples for i in mine) * self.tokens.manifest.seq_len
        return tqdm(total=total, unit="tok", unit_scale=True, desc="teacher cache",
                    disable=not (self.cfg.progress and self.ctx.rank == 0))

    def _open_shard(self, index: int) -> tuple[ShardEntry, str, ShardReader]:
        """Token shard `index`: its manifest entry, its name for messages, and a reader (sha256 checked)."""
        entry, where = self.tokens.manifest.shards[index], self.tokens.where(index)
        url = self.tokens.url(index)
        verify_shard(url, entry.sha256, where=where)
        return entry, where, ShardReader(url, expected=entry.samples, where=where)

    def _cache_shard(self, index: int, bar) -> ShardRecord | None:
        entry, where, reader = self._open_shard(index)
        writer = CacheShardWriter(self.cfg.output, entry.name, source=entry) if self.ctx.tp_rank == 0 else None
        try:
            for start in range(0, entry.samples, self.cfg.micro_batch):
                raws = reader.take(min(self.cfg.micro_batch, entry.samples - start))
                self._cache_batch(raws, where, writer)
                bar.update(len(raws) * self.tokens.manifest.seq_len * self.ctx.dp_size)
        except BaseException:
            if writer is not None:
                writer.abandon()
            raise
        finally:
            reader.close()
        return writer.close() if writer is not None else None

    def _cache_batch(self, raws: list[dict], where: str, writer: CacheShardWriter | None) -> None:
        manifest = self.tokens.manifest
        decoded = [decode_sample(raw, seq_len=manifest.seq_len, dtype=manifest.dtype, where=where) for raw in raws]
        self._cache_decoded([raw["__key__"] for raw in raws], decoded, where, writer)

    @torch.inference_mode()
    def _cache_decoded(self, keys: list[str], decoded: list, where: str, writer: CacheShardWriter | None) -> None:
        """Run the teacher over decoded (tokens, segments) samples and write their targets (tp rank 0)."""
        manifest = self.tokens.manifest
        tokens, segments = collate(decoded)
        tokens = tokens.to(self.ctx.device)
        model = self.teacher.model
        document_ids = model.document_ids(segments, manifest.seq_len)
        logits = model(tokens[:, :-1], document_ids)  # [B, S, Vl]
        self._check_finite(logits, keys, where)
        for key, count, targets in self._targets(logits, keys, target_positions(segments)):
            if writer is not None:  # only the replica's writer encodes; the other tp ranks only take part above
                payload, floor_bits = self._encode(targets, count)
                writer.write(key, self.record["member"], payload, positions=count, floor_bits=floor_bits)

    def _check_finite(self, logits: torch.Tensor, keys: list[str], where: str) -> None:
        """A CacheError naming keys[i] when logits[i] ([N, ..., Vl]) holds a NaN or ±inf on any tp rank."""
        bad = ~torch.isfinite(logits.amax(dim=-1))  # max propagates NaN and +inf: one read pass
        bad = bad.reshape(bad.shape[0], -1).any(dim=1).int()
        if self.ctx.tp_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.ctx.tp_group)
        if bad.any():
            key = keys[int(bad.nonzero()[0])]
            raise CacheError(f"{where}: the teacher's logits for sample {key!r} are NaN or infinite; nothing was "
                             f"written for this shard. Check the teacher's weights and compute.dtype")

    def _targets(self, logits: torch.Tensor, keys: list[str], counts):
        """(key, target positions, sparse targets) per sample of a batch's logits [B, S, Vl]: (ids, logprobs,
        log_rest) for top-K, (ids, counts) for sampled, at the sample's first counts[b] positions only
        (format.target_positions). The real rows of the whole batch go through one collective call over the
        tp group (every tp rank takes part), then are split per sample; padding rows are never computed."""
        counts = [int(c) for c in counts]
        real = torch.cat([logits[row, :count] for row, count in enumerate(counts)])  # [Σ counts, Vl]
        uniforms = None
        if self.cfg.targets.mode == "sampled":
            uniforms = torch.cat([key_uniforms(self.cfg.seed, key, logits.shape[1], self.cfg.targets.draws)[:count]
                                  for key, count in zip(keys, counts)])
        parts = [t.split(counts) for t in self._sparse_targets(real, uniforms)]
        for row, key in enumerate(keys):
            yield key, counts[row], tuple(part[row] for part in parts)

    def _sparse_targets(self, real: torch.Tensor, uniforms: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The targets of logits rows `real` [N, Vl] in one collective call over the tp group: (ids, logprobs,
        log_rest) for top-K, (ids, counts) for sampled, whose draws `uniforms` [N, draws] (float64, the
        `key_uniforms` rows of the positions) decide."""
        targets, group, vocab = self.cfg.targets, self.ctx.tp_group, self.teacher.vocab_size
        if targets.mode == "topk":
            return topk_targets(real, k=targets.k, temperature=targets.temperature, vocab_size=vocab, group=group)
        return sampled_targets(real, uniforms.to(real.device), temperature=targets.temperature, vocab_size=vocab,
                               group=group)

    def _encode(self, targets: tuple[torch.Tensor, ...], count: int) -> tuple[bytes, float]:
        """(codec record, information floor in bits) of one sample's targets at `count` positions."""
        self.samples_encoded += 1
        arrays = [t.cpu().numpy() for t in targets]
        if self.cfg.targets.mode == "topk":
            return encode_record(self.codec, count, *arrays), self.codec.floor_bits() * count
        ids, counts = arrays
        unique = (ids >= 0).sum(axis=1)
        width = max(1, int(unique.max(initial=0)))
        return encode_record(self.codec, count, ids[:, :width], counts[:, :width]), \
            float(self.codec.floor_bits(unique).sum())

    # ---- the end

    def _finish(self):
        folder, names = Path(self.cfg.output), [s.name for s in self.tokens.manifest.shards]
        records = [ShardRecord.read(folder, name) for name in names]
        if any(r is None for r in records):
            return None
        extra = {"targets": self.record, "teacher": self.teacher.identity, "job": self.job}
        return write_cache_manifest(folder, self.tokens.manifest, records, extra).to_json()

    def _summary(self, todo: list[int], written: list, elapsed: float, manifest) -> dict:
        mine = [r for r in written if r is not None]
        totals = torch.tensor([len(mine), sum(r.positions for r in mine), sum(r.bytes for r in mine), elapsed],
                              dtype=torch.float64)
        if self.ctx.world_size > 1:
            elapsed_max = totals[3:].clone().to(self.ctx.device)
            dist.all_reduce(elapsed_max, op=dist.ReduceOp.MAX)
            summed = totals[:3].to(self.ctx.device)
            dist.all_reduce(summed)
            totals = torch.cat([summed.cpu(), elapsed_max.cpu()])
        shards, positions, stored, seconds = totals.tolist()
        return {"shards_total": len(self.tokens.manifest.shards), "shards_todo": len(todo),
                "shards_written": int(shards), "tokens": int(positions), "seconds": seconds,
                "tokens_per_s": positions / seconds if seconds > 0 else 0.0,
                "bytes_per_token": stored / positions if positions else 0.0, "complete": manifest is not None,
                "output": self.cfg.output, "samples_encoded": self.samples_encoded}

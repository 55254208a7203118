"""Teacher-sampled prefixes for the cache job (`prefixes.source: teacher`): f-DISTILL's KL and SeqKD, offline.

For each token sample, its first `prompt_len` tokens (all the real tokens of a shorter, padded sample)
are the prompt; the teacher continues it (`pipeline.generate.generate`: draws seeded by (seed, the
sample's key), EOS = the token manifest's eos_id, ids the token shards' vocabulary lacks never drawn)
with up to min(max_new_tokens, seq_len + 1 − prompt) new tokens. The new token sample keeps the source
sample's key and holds the prompt, then the continuation, then EOS ids as padding after its end; its
segments are [0, end], one document (the continuation attended to the whole prompt as one sequence, so
the targets and the student must too), and its `mask.npy` (uint8 [seq_len]) counts position t, whose
label is token t + 1, when that label is generated (`loss_on: generated`, t ≥ prompt − 1) or real
(`all`). One pass over a token shard writes both the generated token shard (GENERATED/NAME.tar.gz, a
token shard like any other; the manifest says packing bestfit, as a row that stops at EOS is padded)
and the cache shard of the teacher's targets at every real position (0 … end − 2). The targets come
from the logits the decoder computes anyway (`generate(on_logits=TargetsAlong(...))`): the prompt
positions' from prefill, position P − 1 + s's from decode step s, each call's rows through the plain
job's own `_sparse_targets` (`topk_targets` / `sampled_targets`, sampled draws from `key_uniforms` at
the absolute position) and NaN/inf check; there is no second forward. The cache's source shards are
the generated ones, so `distill train data.tokens=GENERATED data.teacher_cache=OUTPUT` joins and
checks them as any cache, and `distill verify-cache OUTPUT --tokens GENERATED --teacher T` recomputes
them with a full forward (incremental logits equal it to ~1e-5 relative, far inside the top-K codec's
bound; a sampled draw differs only where the two straddle an integer-weight boundary, ~1e-5 of a draw).

Order and restart: the generated shard is published (partial file, fsync, rename) before its cache shard,
and a shard is done only when its cache done record and its generated shard both exist; otherwise a rerun
makes both again, with the same bytes, since a row's draws depend on its key and step only (not on its
batch, a rerun or the TP size). The generated manifest is written when every shard is done, then the
cache manifest. The generated folder is bound to the job like the cache folder (identity.py).

Design choice: generation and targets in one pass of one job, from one set of logits, so the sequences
are never read back nor run through the teacher again; the costs are that prefill computes the output
layer at every prompt position (generation alone computes the last one only), the targets are computed
per decode step on the few rows still active (one top-K/draw call and one small copy to the CPU per
step, rather than one call per batch), the cache's top-K values follow the decoder's numerics (equal to
a full forward's to ~1e-5, not bit for bit), and a killed job redoes the generation of its unfinished
shard. The prompt is a raw window of the packed sample, so it can span a document boundary of the corpus.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.config import CacheConfig, ConfigError, PrefixConfig, config_to_dict
from pipeline.generate import generate
from pipeline.teacher.identity import bind_output
from pipeline.teacher.format import target_positions
from pipeline.teacher.job import CacheJob, key_uniforms, on_first_rank
from pipeline.teacher.writer import CacheShardWriter, ShardRecord, partial_path, publish, write_cache_manifest
from tokenization.format import HashingFile, Manifest, ShardEntry, ShardWriter, decode_sample, encode_sample, \
    write_manifest, MASK_MEMBER

GENERATED_DIR = "generated"  # the generated token shards' folder inside the output when `generated` is empty
SAMPLING_MODES = ("sample", "greedy")


def generated_folder(cfg: CacheConfig) -> Path:
    return Path(cfg.generated) if cfg.generated else Path(cfg.output) / GENERATED_DIR


def prefix_record(prefixes: PrefixConfig) -> dict:
    """The prefix settings as the job record and both manifests keep them."""
    return {"source": prefixes.source, "prompt_len": prefixes.prompt_len, "loss_on": prefixes.loss_on,
            "sampling": config_to_dict(prefixes.sampling)}


def check_prefixes(cfg: CacheConfig, tokens: Manifest, where: str) -> None:
    """ConfigErrors, before any work, for prefix settings these token shards cannot be continued with."""
    prefixes = cfg.prefixes
    if prefixes.sampling.mode not in SAMPLING_MODES:  # the config loader refuses it; a hand-built config may not
        raise ConfigError("prefixes.sampling.mode", f"expected one of {', '.join(SAMPLING_MODES)}, got "
                                                    f"{prefixes.sampling.mode!r}")
    if not 1 <= prefixes.prompt_len <= tokens.seq_len:
        raise ConfigError("prefixes.prompt_len", f"{prefixes.prompt_len} leaves no token to generate: the samples "
                                                 f"of {where} hold seq_len + 1 = {tokens.seq_len + 1} tokens; "
                                                 f"expected 1 ≤ prompt_len ≤ seq_len = {tokens.seq_len}")
    if generated_folder(cfg).resolve() == Path(cfg.output).resolve():
        raise ConfigError("generated", f"{cfg.generated} is the output folder; the generated token shards need "
                                       f"a folder of their own (empty = OUTPUT/{GENERATED_DIR})")


def continued_sample(prompt: np.ndarray, new: np.ndarray, *, seq_len: int, eos_id: int, dtype: np.dtype,
                     loss_on: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [seq_len + 1], segments [0, end], mask [seq_len]) of a prompt and its continuation."""
    end = len(prompt) + len(new)
    tokens = np.full(seq_len + 1, eos_id, dtype=dtype)
    tokens[: len(prompt)] = prompt
    tokens[len(prompt): end] = new
    mask = np.zeros(seq_len, dtype=np.uint8)
    mask[(len(prompt) - 1 if loss_on == "generated" else 0): end - 1] = 1
    return tokens, np.array([0, end], dtype=np.int32), mask


class GeneratedShardWriter:
    """One generated token shard, compressed as every token shard: visible only whole (`close`)."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self._file = HashingFile(partial_path(folder, name))
        self._tar = ShardWriter(self._file)
        self.samples = self.tokens = 0

    def write(self, sample: dict, end: int) -> None:
        self._tar.write(sample)
        self.samples += 1
        self.tokens += end

    def close(self) -> ShardEntry:
        self._tar.close()
        publish(self._file, partial_path(self.folder, self.name), self.folder / self.name)
        return ShardEntry(self.name, self.samples, self.tokens, self._file.sha.hexdigest())

    def abandon(self) -> None:
        self._file.file.close()
        partial_path(self.folder, self.name).unlink(missing_ok=True)


class TargetsAlong:
    """The `on_logits` observer of one batch's generation (`LogitsObserver`): each row's targets, computed
    from the logits the decoder makes anyway, by the cache job's own `_sparse_targets`.

    `last[b]`: row b's last position that gets a target (end − 2 at the row's length limit; a row that
    stops at EOS earlier is never fed its last token, so its logits stop at end − 2 too). Each call's
    rows go through one collective call over the tp group and are checked for NaN/inf first (naming the
    row's key); only their compact targets are moved to the CPU (with `keep`, the writing rank; the
    other tp ranks only take part). Sampled targets draw with `key_uniforms(seed, key, seq_len, draws)`
    at the absolute position, as the full-forward job does.
    """

    def __init__(self, job: CacheJob, keys: list[str], last: list[int], where: str, *, keep: bool):
        self.job, self.keys, self.where, self.keep = job, keys, where, keep
        self.last = torch.tensor(last)
        self.parts: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in keys]
        self.filled = [0] * len(keys)
        cfg, seq_len = job.cfg, job.tokens.manifest.seq_len
        self.uniforms = torch.stack([key_uniforms(cfg.seed, key, seq_len, cfg.targets.draws) for key in keys]) \
            if cfg.targets.mode == "sampled" else None

    def __call__(self, rows: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor) -> None:
        need = positions <= self.last[rows]  # identical on every tp rank, so all of them skip or call alike
        if not bool(need.all()):
            rows, positions, logits = rows[need], positions[need], logits[need.to(logits.device)]
        if rows.numel() == 0:
            return
        self.job._check_finite(logits, [self.keys[r] for r in rows.tolist()], self.where)
        uniforms = self.uniforms[rows, positions] if self.uniforms is not None else None
        found = self.job._sparse_targets(logits, uniforms)
        if not self.keep:
            return
        found = [t.cpu() for t in found]
        runs, counts = torch.unique_consecutive(rows, return_counts=True)
        starts = positions[torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)[:-1]])]
        for row, start, *part in zip(runs.tolist(), starts.tolist(), *(t.split(counts.tolist()) for t in found)):
            if start != self.filled[row]:  # the decoder's contract: each row's positions in order, none skipped
                raise RuntimeError(f"{self.keys[row]}: logits of position {start} came after {self.filled[row]}")
            self.parts[row].append(tuple(part))
            self.filled[row] += len(part[0])

    def targets(self, row: int, count: int) -> tuple[torch.Tensor, ...]:
        """Row `row`'s targets at positions 0 … count − 1 (its parts are released)."""
        if self.filled[row] < count:
            raise RuntimeError(f"{self.keys[row]}: {count} target positions expected, the decoder gave "
                               f"{self.filled[row]}")
        parts, self.parts[row] = self.parts[row], []
        return tuple(torch.cat(column)[:count] for column in zip(*parts))


class SampledPrefixJob(CacheJob):
    """The cache job along the teacher's own continuations; see the module docstring."""

    def __init__(self, cfg: CacheConfig, ctx, shard_range: tuple[int, int] | None):
        self.generated_tokens = 0  # this replica's new tokens (counted on its tp rank 0 only)
        self.folder = generated_folder(cfg)
        super().__init__(cfg, ctx, shard_range)
        on_first_rank(ctx, lambda: bind_output(self.folder, self.job))

    def _check_settings(self) -> None:
        check_prefixes(self.cfg, self.tokens.manifest, self.cfg.tokens)

    def _job_record(self) -> dict:
        record = super()._job_record()
        record.update(prefixes=prefix_record(self.cfg.prefixes), seed=self.cfg.seed)  # the seed decides the draws
        return record

    def _done(self, name: str) -> bool:
        return ShardRecord.read(Path(self.cfg.output), name) is not None and (self.folder / name).is_file()

    def _missing(self) -> list[int]:
        names = [s.name for s in self.tokens.manifest.shards]
        return [i for i in range(*self.range) if not self._done(names[i])]

    def _progress_bar(self, mine: list[int]):
        total = sum(self.tokens.manifest.shards[i].samples for i in mine)
        return tqdm(total=total, unit="sample", desc="teacher samples",
                    disable=not (self.cfg.progress and self.ctx.rank == 0))

    def _cache_shard(self, index: int, bar) -> ShardRecord | None:
        entry, where, reader = self._open_shard(index)
        writers = None
        if self.ctx.tp_rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            writers = (GeneratedShardWriter(self.folder, entry.name),
                       CacheShardWriter(self.cfg.output, entry.name, source=entry))
        try:
            for start in range(0, entry.samples, self.cfg.micro_batch):
                raws = reader.take(min(self.cfg.micro_batch, entry.samples - start))
                self._sample_batch(raws, where, writers)
                bar.update(len(raws) * self.ctx.dp_size)
                bar.set_postfix(generated=f"{self.generated_tokens * self.ctx.dp_size:,} tok", refresh=False)
        except BaseException:
            for writer in writers or ():
                writer.abandon()
            raise
        finally:
            reader.close()
        if writers is None:
            return None
        generated = writers[0].close()  # the token shard is published before the cache shard made from it
        return writers[1].close(source=generated)

    def _sample_batch(self, raws: list[dict], where: str, writers) -> None:
        """Continue a batch's prompts, taking their targets from the decoder's logits as it goes, then write
        each generated sample and its targets (tp rank 0)."""
        manifest, prefixes = self.tokens.manifest, self.cfg.prefixes
        keys = [raw["__key__"] for raw in raws]
        prompts = []
        for raw in raws:
            tokens, segments = decode_sample(raw, seq_len=manifest.seq_len, dtype=manifest.dtype, where=where)
            prompts.append(tokens[: min(prefixes.prompt_len, int(segments[-1]))].astype(np.int64))
        limits = [min(prefixes.sampling.max_new_tokens, manifest.seq_len + 1 - len(p)) for p in prompts]
        sampling = dataclasses.replace(prefixes.sampling, max_new_tokens=max(limits))
        along = TargetsAlong(self, keys, [p + n - 2 for p, n in zip(map(len, prompts), limits)], where,
                             keep=writers is not None)
        generation = generate(self.teacher.model, [torch.from_numpy(p) for p in prompts], keys, sampling,
                              vocab_size=manifest.vocab_size, eos_id=manifest.eos_id, seed=self.cfg.seed,
                              group=self.ctx.tp_group, on_logits=along, limits=limits)
        if writers is None:  # this tp rank took part in the targets' collectives; rank 0 writes them
            return
        for row, (key, prompt, new, limit) in enumerate(zip(keys, prompts, generation.tokens, limits)):
            tokens, segments, mask = continued_sample(prompt, new[:limit].numpy(), seq_len=manifest.seq_len,
                                                      eos_id=manifest.eos_id, dtype=manifest.dtype,
                                                      loss_on=prefixes.loss_on)
            writers[0].write(encode_sample(key, tokens, segments, mask=mask), int(segments[-1]))
            self.generated_tokens += int(segments[-1]) - len(prompt)
            count = int(target_positions(segments))
            payload, floor_bits = self._encode(along.targets(row, count), count)
            writers[1].write(key, self.record["member"], payload, positions=count, floor_bits=floor_bits)

    # ---- the end

    def _finish(self):
        output, names = Path(self.cfg.output), [s.name for s in self.tokens.manifest.shards]
        records = [ShardRecord.read(output, name) for name in names]
        if any(r is None for r in records) or not all((self.folder / name).is_file() for name in names):
            return None
        source = self.tokens.manifest
        facts = {"prefixes": prefix_record(self.cfg.prefixes), "seed": self.cfg.seed, "mask_member": MASK_MEMBER,
                 "teacher": self.teacher.identity, "source_tokens": self.tokens.fingerprint()}
        generated = Manifest(source.tokenizer_fingerprint, source.vocab_size, source.eos_id, source.seq_len, "bestfit",
                             tuple(ShardEntry(r.source, r.samples, r.tokens, r.source_sha256) for r in records),
                             command="distill cache", extra=facts)
        write_manifest(self.folder, generated)  # before the cache's: a complete cache implies complete tokens
        extra = {"targets": self.record, "teacher": self.teacher.identity, "job": self.job,
                 "prefixes": prefix_record(self.cfg.prefixes)}
        return write_cache_manifest(output, generated, records, extra).to_json()

    def _summary(self, todo: list[int], written: list, elapsed: float, manifest) -> dict:
        summary = super()._summary(todo, written, elapsed, manifest)
        count = torch.tensor([float(self.generated_tokens)], dtype=torch.float64, device=self.ctx.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(count)
        generated, seconds = int(count.item()), summary["seconds"]
        summary.update(generated=str(self.folder), generated_tokens=generated,
                       generated_tokens_per_s=generated / seconds if seconds > 0 else 0.0)
        return summary

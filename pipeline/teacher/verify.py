"""`distill verify-cache`: is a cache folder whole, aligned with its token shards, and true to its teacher?

Integrity (always): the manifest and its targets record; the join with the token shards (tokenizer,
source sha256, sample counts; pipeline/data/sources.py); every cache shard's sha256; and, reading the
cache and token shards side by side, every key in order and every record decodable as the token
sample's target positions (its real labels only, format.py).

Fidelity (with `teacher`): the teacher runs in this process at TP=1 on whole samples spread evenly over
the dataset (about `positions` positions). Top-K: the decoded ids against the recomputed top-K, the
largest log-prob error, the largest error of each probability's ratio to its position's top (which the
codec bounds), and KL(p‖p̂) between the teacher's distribution and the decoded one, both coarsened to
the K ids plus the rest (finite, and zero only for an exact cache). Sampled: the draws are recomputed
from the same seed and key; the share of positions drawn identically is reported.

Design choice: problems are collected, not raised, so one run lists everything wrong; the cost is a
full read of every cache and token shard.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.shards import ShardReader, sha256_of
from pipeline.data.sources import ShardSet, sidecar_shards
from pipeline.teacher.codec import SampledCodec
from pipeline.teacher.errors import CacheError
from pipeline.teacher.format import codec_of, decode_record, target_positions
from tokenization.format import ShardFormatError, decode_sample

ID_MISMATCH_LIMIT = 0.01
REPRODUCED_LIMIT = 0.99


def verify_cache(folder: str, tokens: str, *, teacher: str | None = None, positions: int = 256,
                 progress: bool = True) -> dict:
    """A report: `problems` (one line each, empty when all is well) plus figures."""
    report: dict = {"problems": []}
    try:
        cache, source = ShardSet(folder, role="cache"), ShardSet(tokens)
        index = sidecar_shards(source, cache)
        record = cache.manifest.extra.get("targets") or {}
        codec = codec_of(record, where=f"{folder}/manifest.json")
    except (ShardFormatError, CacheError) as err:
        report["problems"].append(str(err))
        return report
    report.update(shards=len(cache.manifest.shards), samples=cache.manifest.total_samples,
                  mode=record["mode"], bytes_per_token=cache.manifest.extra.get("bytes_per_token"),
                  floor_bytes_per_token=cache.manifest.extra.get("floor_bytes_per_token"))
    _check_shards(cache, source, index, codec, record["member"], report["problems"], progress)
    if teacher is not None and not report["problems"]:
        report.update(Fidelity(cache, source, index, codec, record, teacher).measure(positions, report["problems"]))
    return report


def _check_shards(cache: ShardSet, source: ShardSet, index: list, codec, member: str, problems: list,
                  progress: bool) -> None:
    for token_shard in tqdm(range(len(source.manifest.shards)), desc="verify cache", disable=not progress,
                            leave=False):
        shard = index[token_shard]
        entry, where = cache.manifest.shards[shard], cache.where(shard)
        try:
            actual = sha256_of(cache.url(shard))
            if actual != entry.sha256:
                problems.append(f"{where}: sha256 {actual} does not match the manifest's {entry.sha256}")
                continue
            _check_samples(cache, source, shard, token_shard, codec, member)
        except (ShardFormatError, CacheError, OSError) as err:
            problems.append(str(err))


def _check_samples(cache: ShardSet, source: ShardSet, shard: int, token_shard: int, codec, member: str) -> None:
    count, where = cache.manifest.shards[shard].samples, cache.where(shard)
    ours = ShardReader(cache.url(shard), expected=count, where=where)
    theirs = ShardReader(source.url(token_shard), expected=count, where=source.where(token_shard))
    try:
        for _ in range(count):
            (sample,), (token_sample,) = ours.take(1), theirs.take(1)
            key = sample["__key__"]
            if key != token_sample["__key__"]:
                raise CacheError(f"{where}: sample key {key!r} where the token shard has {token_sample['__key__']!r}")
            if member not in sample:
                raise CacheError(f"{where}: sample {key!r} has no member {member!r}")
            manifest = source.manifest
            _, segments = decode_sample(token_sample, seq_len=manifest.seq_len, dtype=manifest.dtype,
                                        where=source.where(token_shard))
            decode_record(codec, sample[member], int(target_positions(segments)), where=f"{where} sample {key!r}")
    finally:
        ours.close()
        theirs.close()


class Fidelity:
    """Recomputes whole samples with the teacher at TP=1 and compares them with the decoded cache."""

    def __init__(self, cache: ShardSet, source: ShardSet, index: list, codec, record: dict, teacher: str):
        self.cache, self.source, self.index, self.codec, self.record = cache, source, index, codec, record
        self.teacher_path = teacher

    def measure(self, positions: int, problems: list) -> dict:
        from pipeline.config import ComputeConfig
        from pipeline.model import load_model
        from pipeline.parallel import ParallelContext

        with ParallelContext.from_env(tp=1) as ctx:
            model = load_model(self.teacher_path, ctx, ComputeConfig()).eval()
            samples = self._chosen(positions)
            found = [self._compare(model, *where) for where in samples]
        figures = self._summarise(found)
        self._judge(figures, problems)
        return figures

    def _chosen(self, positions: int) -> list[tuple[int, int]]:
        """(token shard, sample) pairs evenly spread over the dataset, about `positions` positions in all."""
        counts = [s.samples for s in self.source.manifest.shards]
        wanted = min(sum(counts), max(1, math.ceil(positions / self.source.manifest.seq_len)))
        flat = np.linspace(0, sum(counts) - 1, wanted).round().astype(int)
        starts = np.cumsum([0] + counts[:-1])
        shards = np.searchsorted(starts, flat, side="right") - 1
        return [(int(shard), int(i - starts[shard])) for i, shard in zip(flat, shards)]

    def _read(self, shards: ShardSet, shard: int, sample: int) -> dict:
        entry = shards.manifest.shards[shard]
        reader = ShardReader(shards.url(shard), expected=entry.samples, start=sample, where=shards.where(shard))
        try:
            return reader.take(1)[0]
        finally:
            reader.close()

    @torch.inference_mode()
    def _compare(self, model, token_shard: int, sample: int) -> dict:
        raw = self._read(self.source, token_shard, sample)
        manifest = self.source.manifest
        tokens, segments = decode_sample(raw, seq_len=manifest.seq_len, dtype=manifest.dtype, where="verify")
        batch = torch.from_numpy(tokens.astype(np.int64))[None]
        document_ids = model.document_ids(torch.from_numpy(segments.astype(np.int64))[None], manifest.seq_len)
        count = int(target_positions(segments))  # the positions with a real label: the record's
        logits = model(batch[:, :-1], document_ids)[0][:count, : self.record["vocab_size"]]  # [count, V]
        payload = self._read(self.cache, self.index[token_shard], sample)[self.record["member"]]
        decoded = decode_record(self.codec, payload, count)
        if count == 0:  # one real token, no real label: the record is empty, nothing to compare
            return {"positions": 0, "reproduced": 0, "id_mismatch": 0, "logprob_error": 0.0, "ratio_error": 0.0,
                    "kl": torch.zeros(0, dtype=torch.float64)}
        if isinstance(self.codec, SampledCodec):
            return self._compare_sampled(logits, raw["__key__"], decoded)
        return self._compare_topk((logits.double() / self.record["temperature"]).log_softmax(-1), decoded)

    def _compare_topk(self, logp: torch.Tensor, decoded: tuple) -> dict:
        ids, logprobs, log_rest = (torch.from_numpy(a) for a in decoded)
        want_ids = logp.topk(ids.shape[1], dim=-1).indices.sort(dim=-1).values
        truth = logp.gather(-1, ids)
        truth_rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
        p = torch.cat([truth, truth_rest[:, None]], -1).exp()
        q_log = torch.cat([logprobs.double(), log_rest.double()[:, None]], -1)
        kl = (p * (p.clamp_min(1e-300).log() - q_log)).nan_to_num(0.0).sum(-1)
        ratio = (logprobs.double() - logprobs.double().amax(-1, keepdim=True)).exp()
        true_ratio = (truth - truth.amax(-1, keepdim=True)).exp()
        return {"positions": ids.shape[0], "id_mismatch": int((ids != want_ids).any(-1).sum()),
                "logprob_error": float((logprobs.double() - truth).abs().max()),
                "ratio_error": float((ratio - true_ratio).abs().max()), "kl": kl}

    def _compare_sampled(self, logits: torch.Tensor, key: str, decoded: tuple) -> dict:
        from pipeline.teacher.job import key_uniforms
        from pipeline.teacher.targets import sampled_targets

        ids, counts = decoded
        seed = self.cache.manifest.extra.get("job", {}).get("seed") or 0
        uniforms = key_uniforms(seed, key, self.source.manifest.seq_len, self.record["draws"])[: logits.shape[0]]
        want_ids, want_counts = sampled_targets(logits.float(), uniforms, temperature=self.record["temperature"],
                                                vocab_size=self.record["vocab_size"])
        width = ids.shape[1]
        same = (torch.from_numpy(ids) == want_ids[:, :width]).all(-1)
        same &= (torch.from_numpy(counts) == want_counts[:, :width]).all(-1) & (want_ids[:, width:] < 0).all(-1)
        return {"positions": ids.shape[0], "reproduced": int(same.sum())}

    def _summarise(self, found: list[dict]) -> dict:
        positions = sum(f["positions"] for f in found)
        if positions == 0:  # every sample checked held one real token: nothing to compare
            return {"positions_checked": 0}
        if isinstance(self.codec, SampledCodec):
            return {"positions_checked": positions, "draws_reproduced": sum(f["reproduced"] for f in found) / positions}
        kl = torch.cat([f["kl"] for f in found])
        return {"positions_checked": positions, "id_mismatch": sum(f["id_mismatch"] for f in found) / positions,
                "max_logprob_error": max(f["logprob_error"] for f in found),
                "max_ratio_error": max(f["ratio_error"] for f in found),
                "ratio_error_bound": self.record.get("ratio_error_bound"),
                "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}

    def _judge(self, figures: dict, problems: list) -> None:
        where = self.cache.location
        if "draws_reproduced" in figures and figures["draws_reproduced"] < REPRODUCED_LIMIT:
            problems.append(f"{where}: only {figures['draws_reproduced']:.1%} of the checked positions' draws "
                            f"reproduce with this teacher; the cache was made by another teacher or seed")
        if figures.get("id_mismatch", 0) > ID_MISMATCH_LIMIT:
            problems.append(f"{where}: {figures['id_mismatch']:.1%} of the checked positions have other top-K ids "
                            f"than this teacher gives; the cache was made by another teacher or data")
        bound = figures.get("ratio_error_bound")
        if bound is not None and figures["max_ratio_error"] > bound * 1.05 + 1e-3:
            problems.append(f"{where}: a stored probability ratio is off by {figures['max_ratio_error']:.3g}, more "
                            f"than the codec's bound {bound:.3g}")

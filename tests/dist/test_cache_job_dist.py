"""The cache job in 2 gloo processes against the single-process job: DP=2 splits the shards and writes the
same bytes; TP=2 splits the teacher and the vocabulary and decodes to the same targets (its logits differ
from TP=1's in the last bits, so the float32 rest masses may differ in their last bits too; sampled draws
do not, so a sampled cache is byte-identical). Each replica encodes its samples once: on its writing rank.
Teacher-sampled prefixes: the continuations' draws are exact at every TP size too, so TP=2 writes TP=1's
generated token shards and (with sampled targets) its cache, byte for byte.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import CacheConfig, from_dict
from pipeline.teacher.format import codec_of
from pipeline.teacher.job import run_cache
from tests.harness import run_distributed
from tests.modelmaker import VOCAB, make_hf_model
from tests.shardmaker import make_token_shards

pytestmark = pytest.mark.dist
SEQ = 12
SIZES = (3, 2, 4, 1, 2)


def job_config(base: Path, out: str, tp: int, mode: str) -> CacheConfig:
    return from_dict(CacheConfig, {"teacher": str(base / "teacher"), "tokens": str(base / "tokens"),
                                   "output": str(base / out), "progress": False, "micro_batch": 2,
                                   "parallel": {"tp": tp}, "targets": {"mode": mode, "k": 6, "draws": 16}})


def job_worker(rank: int, world: int, base: str, out: str, tp: int, mode: str) -> dict:
    return run_cache(job_config(Path(base), out, tp, mode))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache_dist")
    make_token_shards(folder / "tokens", SIZES, seq_len=SEQ, vocab_size=VOCAB, seed=2)
    make_hf_model("llama_kv4", folder / "teacher")
    for mode in ("topk", "sampled"):
        run_cache(job_config(folder, f"single_{mode}", 1, mode))
    return folder


def files(folder: Path, pattern: str = "*.tar") -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))} | {
        "manifest.json": (folder / "manifest.json").read_bytes()}


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_two_replicas_write_the_single_process_bytes(base, mode):
    summaries = run_distributed(job_worker, 2, str(base), f"dp2_{mode}", 1, mode)
    assert all(s["complete"] and s["shards_written"] == 5 for s in summaries)
    assert files(base / f"dp2_{mode}") == files(base / f"single_{mode}")
    encoded = [s["samples_encoded"] for s in summaries]  # each replica encodes the samples of its own shards
    assert sum(encoded) == sum(SIZES) and min(encoded) > 0


def decoded(folder: Path) -> list:
    import json
    import tarfile

    codec = codec_of(json.loads((folder / "manifest.json").read_text())["extra"]["targets"])
    out = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [(m.name, codec.decode(tar.extractfile(m).read())) for m in tar.getmembers()]
    return out


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_tensor_parallel_teacher_decodes_to_the_same_targets_encoding_once(base, mode):
    summaries = run_distributed(job_worker, 2, str(base), f"tp2_{mode}", 2, mode)
    assert all(s["complete"] and s["shards_written"] == 5 for s in summaries)
    # one replica: its tp rank 0 encodes every sample, tp rank 1 computes the targets with it but encodes none
    assert [s["samples_encoded"] for s in summaries] == [sum(SIZES), 0]
    if mode == "sampled":  # the draws are exact at every TP size, so the bytes are TP=1's
        assert files(base / f"tp2_{mode}") == files(base / f"single_{mode}")
    single, split = decoded(base / f"single_{mode}"), decoded(base / f"tp2_{mode}")
    assert [name for name, _ in single] == [name for name, _ in split]
    for (name, want), (_, got) in zip(single, split):
        assert np.array_equal(want[0], got[0]), f"{name}: ids differ"
        for a, b in zip(want[1:], got[1:]):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4, err_msg=name)


def prefix_config(base: Path, out: str, tp: int) -> CacheConfig:
    return from_dict(CacheConfig, {"teacher": str(base / "teacher"), "tokens": str(base / "tokens"),
                                   "output": str(base / out), "progress": False, "micro_batch": 3,
                                   "parallel": {"tp": tp}, "targets": {"mode": "sampled", "draws": 16},
                                   "prefixes": {"source": "teacher", "prompt_len": 4,
                                                "sampling": {"max_new_tokens": 6}}})


def prefix_worker(rank: int, world: int, base: str, out: str, tp: int) -> dict:
    return run_cache(prefix_config(Path(base), out, tp))


@pytest.fixture(scope="module")
def prefix_single(base) -> dict:
    return run_cache(prefix_config(base, "prefix_single", 1))


@pytest.mark.parametrize("tp", [2, 1])
def test_teacher_sampled_prefixes_at_tp2_or_dp2_write_the_single_process_bytes(base, prefix_single, tp):
    summaries = run_distributed(prefix_worker, 2, str(base), f"prefix_{tp}", tp)
    assert all(s["complete"] and s["shards_written"] == len(SIZES) for s in summaries)
    assert 0 < prefix_single["generated_tokens"] <= 6 * sum(SIZES)
    assert [s["generated_tokens"] for s in summaries] == [prefix_single["generated_tokens"]] * 2
    for sub in ("", "generated"):
        want, got = files(base / "prefix_single" / sub, "*.tar*"), files(base / f"prefix_{tp}" / sub, "*.tar*")
        assert len(want) == len(SIZES) + 1 and got == want, f"{sub or 'cache'} differs at tp={tp}, world 2"

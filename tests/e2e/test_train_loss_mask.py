"""A sample's loss mask decides what the trainer trains on, counts and evaluates, checked against references.

The data are bestfit windows of a Markov language (tests/languagemaker.py; some EOS padding), written here
with a `mask.npy` on most samples the way a teacher-sampled token folder carries one: a prompt of
zeros then ones that run on into the padding, an all-zero mask, a mask with a hole, a random one, and
samples with no mask at all (in the same micro-batches as masked ones). A random Hugging Face teacher is
cached over them by the real cache job (which joins by key whatever the token samples carry); the trainer
runs one optimizer step of two micro-batches at a learning rate of 1e-30, so its exported weights are its
initial ones to the bit, and evaluates on every sample.

The references share no code with the trainer, the reader or the loss: transformers runs the exported
student, the positions that count are computed here from the masks this test wrote (by key) and each
sample's end (its last `segments` entry), the cache records are decoded by the codec at the sample's real
positions and then cut to the counted ones, and the divergences come from tests/reference.py. Against them:
- train/loss (CE and KL), train/grad_norm and data/consumed_tokens count the masked positions only;
- eval's loss, perplexity, KL and top-1 agreement count them only;
- the masks matter: the counted positions are markedly fewer than the real ones, so a reader or trainer
  that ignored them would report another loss.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.harness import run_distributed
from tests.languagemaker import FINGERPRINT, MarkovLanguage, bestfit_windows
from tests.modelmaker import VOCAB, make_hf_model
from tests.reference import _coarsen, divergence_rows
from tests.trainkit import student_overrides, train_config

SEQ_LEN = 32
SIZES = [5, 3]
K = 8
MICRO, SLOTS = 2, 2
EVAL_BATCHES = sum(SIZES) // MICRO
RUN = dict(steps=1, micro_batch=MICRO, grad_accumulation=SLOTS, optim__lr=1e-30, optim__min_lr=0.0,
           optim__warmup_steps=0, compute__document_masking="false", log__tensorboard="false",
           data__shuffle="false")


def _mask_of(index: int) -> np.ndarray | None:
    """The loss mask of the dataset's sample `index` (None: no member; every real position counts)."""
    t = np.arange(SEQ_LEN)
    kinds = {0: None, 5: None,                       # no mask, beside masked rows of the same micro-batch
             1: t >= 10, 4: t >= 12, 7: t >= 20,      # a prompt, then ones (also over any padding)
             2: np.zeros(SEQ_LEN, dtype=bool),        # nothing counts
             3: (t >= 5) & (t < 20),                  # a hole at the end
             6: np.random.default_rng(6).random(SEQ_LEN) < 0.5}
    return kinds[index]


def _key(index: int) -> str:
    shard = int(index >= SIZES[0])
    return f"shard-{shard:06d}-{index - SIZES[0] * shard:06d}"


MASKS = {_key(i): _mask_of(i) for i in range(sum(SIZES))}


def _write_masked_shards(folder: Path) -> None:
    from tokenization.format import SHARD_SUFFIX, Manifest, ShardEntry, ShardWriter, encode_sample, write_manifest

    language = MarkovLanguage(VOCAB, seed=0)
    windows = bestfit_windows(language, sum(SIZES), seq_len=SEQ_LEN, seed=1)
    folder.mkdir(parents=True)
    entries, at = [], 0
    for shard, count in enumerate(SIZES):
        name = f"shard-{shard:06d}{SHARD_SUFFIX}"
        with open(folder / name, "wb") as file, ShardWriter(file) as writer:
            for offset in range(count):
                tokens, segments = windows[at + offset]
                writer.write(encode_sample(_key(at + offset), tokens, segments, MASKS[_key(at + offset)]))
        real = sum(int(windows[at + i][1][-1]) for i in range(count))
        entries.append(ShardEntry(name, count, real, hashlib.sha256((folder / name).read_bytes()).hexdigest()))
        at += count
    write_manifest(folder, Manifest(FINGERPRINT, VOCAB, language.eos_id, SEQ_LEN, "bestfit", tuple(entries),
                                    "tests/e2e/test_train_loss_mask.py", extra={"loss_mask": "test"}))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from pipeline.config import CacheConfig, from_dict
    from pipeline.teacher.job import run_cache

    folder = tmp_path_factory.mktemp("lossmask")
    _write_masked_shards(folder / "tokens")
    make_hf_model("llama_gqa", folder / "teacher", seed=3)
    run_cache(from_dict(CacheConfig, {"teacher": str(folder / "teacher"), "tokens": str(folder / "tokens"),
                                      "output": str(folder / "cache"), "progress": False, "micro_batch": 3,
                                      "targets": {"mode": "topk", "k": K}}))
    return folder


def _train_and_export(rank: int, world: int, folder: Path) -> dict:
    """A CE run (evaluated on every sample with the cache) and a KL run, each exported; {name: metrics rows}."""
    from pipeline.train.export import export_checkpoint
    from pipeline.train.run import run_training

    heldout = [f"data.eval_tokens={folder / 'tokens'}", f"data.eval_teacher_cache={folder / 'cache'}",
               f"eval.batches={EVAL_BATCHES}"]
    rows = {}
    for name, cache in (("ce", None), ("kl", folder / "cache")):
        run_dir = folder / name
        overrides = student_overrides(run_dir, folder / "tokens", cache, **RUN) + (heldout if name == "ce" else [])
        assert run_training(train_config(overrides)) == 0
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        rows[name] = {kind: next((r for r in metrics if r.get("kind") == kind), None) for kind in ("train", "eval")}
        export_checkpoint(run_dir, folder / f"{name}_hf", progress=False)
    return rows


@pytest.fixture(scope="module")
def runs(world) -> dict:
    return run_distributed(_train_and_export, 1, world)[0]


# ---- the independent references


def _counted(batch: dict) -> torch.Tensor:
    """[B, S]: label index t + 1 below the sample's end (its largest segments entry) and this test's mask at t."""
    ends = torch.tensor([max(int(v) for v in row if v >= 0) for row in batch["segments"]])
    real = torch.arange(1, SEQ_LEN + 1)[None] < ends[:, None]
    masks = [torch.ones(SEQ_LEN, dtype=torch.bool) if MASKS[key] is None else torch.from_numpy(MASKS[key])
             for key in batch["keys"]]
    return real & torch.stack(masks), real


def _batches(folder: Path, cache: str | None, *, slots: int, steps: int) -> list:
    """The micro-batches the trainer reads (pipeline/train/stream.py): steps 0..steps-1 of each of `slots`
    reader ranks, in order (RUN turns training's shuffle off; eval never shuffles)."""
    from pipeline.train.stream import make_dataset

    cfg = train_config(student_overrides(folder / "x", folder / "tokens", **RUN))
    sets = [make_dataset(str(folder / "tokens"), str(folder / cache) if cache else "", cfg, rank=i, size=slots,
                         shuffle=False) for i in range(slots)]
    return [ds.batch(step) for step in range(steps) for ds in sets]


def _teacher_rows(folder: Path, batch: dict, counted: torch.Tensor, real: torch.Tensor) -> tuple:
    """(ids, log-probs, log rest) at the counted positions: each record decoded at its sample's real positions
    (the cache holds every one of them, masked or not), then cut to the counted ones."""
    from pipeline.teacher.codec import TopkCodec

    record = json.loads((folder / "cache" / "manifest.json").read_text())["extra"]["targets"]
    rows = []
    for payload, count_mask, real_mask in zip((s[f"teacher.{record['member']}"] for s in batch["sidecars"]),
                                              counted, real):
        n_real = int(real_mask.sum())
        ids, logprobs, log_rest = TopkCodec(VOCAB, K, n_real, record["value_bits"]).decode(payload)
        keep = count_mask[:n_real].numpy()
        rows.append((torch.from_numpy(ids[keep]), torch.from_numpy(logprobs[keep]).double(),
                     torch.from_numpy(log_rest[keep]).double()))
    return tuple(torch.cat(parts) for parts in zip(*rows))


def _reference(folder: Path, name: str, batches: list, *, cache: bool, kl: bool) -> dict:
    """Per-counted-token means over `batches` of CE and (with `cache`) tail KL and top-1 agreement, and the
    gradient norm of the mean that is trained (KL with `kl`, else CE)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder / f"{name}_hf", dtype=torch.float32).eval()
    sums = {"ce": 0.0, "kl": 0.0, "top1": 0.0}
    total = sum(int(_counted(b)[0].sum()) for b in batches)
    for batch in batches:
        counted, real = _counted(batch)
        tokens = batch["tokens"]
        log_q = model(input_ids=tokens[:, :-1]).logits.double().log_softmax(-1)[counted]  # [n_counted, V]
        trained = ce = -log_q.gather(-1, tokens[:, 1:][counted][:, None]).squeeze(-1)
        sums["ce"] += float(ce.detach().sum())
        if cache:
            ids, logprobs, log_rest = _teacher_rows(folder, batch, counted, real)
            rows = divergence_rows("kl", torch.cat([logprobs, log_rest[:, None]], -1), _coarsen(log_q, ids), {})
            trained = rows if kl else ce
            sums["kl"] += float(rows.detach().sum())
            sums["top1"] += float((log_q.argmax(-1) == ids.gather(-1, logprobs.argmax(-1, keepdim=True))[:, 0]).sum())
        (trained.sum() / total).backward()
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))
    return {key: value / total for key, value in sums.items()} | {"grad_norm": norm, "tokens": total}


def _close(got: float, want: float, what: str, rtol: float = 1e-5) -> None:
    assert abs(got - want) <= rtol * abs(want) + 1e-7, f"{what}: the run reports {got!r}, the reference {want!r}"


def test_the_masks_remove_many_real_positions(world):
    batches = _batches(world, None, slots=SLOTS, steps=1)
    counted = sum(int(_counted(b)[0].sum()) for b in batches)
    real = sum(int(_counted(b)[1].sum()) for b in batches)
    assert 0 < counted < 0.8 * real, (counted, real)
    assert all("loss_mask" in b for b in batches), "every training micro-batch mixes masked and unmasked rows"


@pytest.mark.parametrize("name", ["ce", "kl"])
def test_training_counts_masked_positions_only(world, runs, name):
    row = runs[name]["train"]
    batches = _batches(world, "cache" if name == "kl" else None, slots=SLOTS, steps=1)
    ref = _reference(world, name, batches, cache=name == "kl", kl=name == "kl")
    _close(row["train/loss"], ref[name], f"{name} train/loss")
    _close(row["train/grad_norm"], ref["grad_norm"], f"{name} train/grad_norm", rtol=1e-4)
    assert row["data/consumed_tokens"] == ref["tokens"]


def test_eval_counts_masked_positions_only(world, runs):
    row = runs["ce"]["eval"]
    batches = _batches(world, "cache", slots=1, steps=EVAL_BATCHES)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(MASKS), "eval reads every sample once"
    ref = _reference(world, "ce", batches, cache=True, kl=False)
    _close(row["eval/loss"], ref["ce"], "eval/loss")
    _close(row["eval/perplexity"], math.exp(ref["ce"]), "eval/perplexity")
    _close(row["eval/divergence"], ref["kl"], "eval/divergence")
    _close(row["eval/top1_agreement"], ref["top1"], "eval/top1_agreement")

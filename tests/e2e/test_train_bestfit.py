"""Bestfit padding counts nowhere, and eval is one ruler, checked against independent references.

The data are bestfit-packed documents of a Markov language (tests/languagemaker.py): about a fifth of
the stored tokens are EOS padding, and one training and one held-out window hold a single real token
(no real label; the training one makes the step's two micro-batches differ widely in real tokens).
A random Hugging Face teacher is cached by the real cache job; the trainer runs one optimizer step of
two micro-batches (grad_accumulation 2) at a learning rate of 1e-30, so its exported weights are its
initial ones to the bit, and then evaluates on every held-out sample.

The references share no code with the trainer, the loss or the cache reader: transformers runs the
exported student and teacher, the real positions are those whose label index is below the sample's
end (the last `segments` entry, read here), the cache records are decoded by the codec at that many
positions, and the divergences come from tests/reference.py. Against them:
- the logged train loss and gradient norm are the mean over the real tokens of both micro-batches
  (padding contributes nothing; a micro-batch with more real tokens weighs more), for CE and for KL;
- eval's perplexity, KL and top-1 agreement count the real held-out tokens only;
- a `renorm` and a `tail` run with the same weights report the same eval KL: eval reads top-K targets
  with the rest bucket whatever the training run's target mode;
- the cache holds targets for the real positions only (its manifest counts them) and verify-cache
  accepts it, for top-K and sampled targets.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed
from tests.languagemaker import MarkovLanguage, make_bestfit_shards
from tests.modelmaker import VOCAB, make_hf_model
from tests.reference import _coarsen, divergence_rows
from tests.trainkit import student_overrides, train_config

SEQ_LEN = 32
TRAIN, HELDOUT = [10, 6], [7, 5]
K, DRAWS = 8, 16
MICRO, SLOTS = 2, 2
EVAL_BATCHES = sum(HELDOUT) // MICRO
RUN = dict(steps=1, micro_batch=MICRO, grad_accumulation=SLOTS, optim__lr=1e-30, optim__min_lr=0.0,
           optim__warmup_steps=0, compute__document_masking="false", log__tensorboard="false",
           data__shuffle="false")
SINGLE_TOKEN = {"train": (8,), "heldout": (7,)}  # windows of one real token: no real label at all


def _cache(folder: Path, tokens: Path, teacher: Path, mode: str) -> Path:
    from pipeline.config import CacheConfig, from_dict
    from pipeline.teacher.job import run_cache

    out = folder / f"cache_{tokens.name}_{mode}"
    run_cache(from_dict(CacheConfig, {"teacher": str(teacher), "tokens": str(tokens), "output": str(out),
                                      "progress": False, "micro_batch": 3,
                                      "targets": {"mode": mode, "k": K, "draws": DRAWS}}))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bestfit")
    language = MarkovLanguage(VOCAB, seed=0)
    for name, sizes, seed in (("train", TRAIN, 1), ("heldout", HELDOUT, 2)):
        make_bestfit_shards(folder / name, language, sizes, seq_len=SEQ_LEN, seed=seed,
                            single_token=SINGLE_TOKEN[name])
    make_hf_model("llama_gqa", folder / "teacher", seed=3)
    for tokens, mode in (("train", "topk"), ("heldout", "topk"), ("heldout", "sampled")):
        _cache(folder, folder / tokens, folder / "teacher", mode)
    return folder


def _train_and_export(rank: int, world: int, folder: Path) -> dict:
    """The three runs (CE read in tail and renorm mode, KL), each exported; {name: (train row, eval row)}."""
    from pipeline.train.export import export_checkpoint
    from pipeline.train.run import run_training

    heldout = [f"data.eval_tokens={folder / 'heldout'}", f"data.eval_teacher_cache={folder / 'cache_heldout_topk'}",
               f"eval.batches={EVAL_BATCHES}"]
    runs = {"ce_tail": (None, "tail"), "ce_renorm": (None, "renorm"), "kl": (folder / "cache_train_topk", "tail")}
    rows = {}
    for name, (cache, mode) in runs.items():
        run_dir = folder / name
        overrides = student_overrides(run_dir, folder / "train", cache, loss__target_mode=mode, **RUN) + heldout
        assert run_training(train_config(overrides)) == 0
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        rows[name] = tuple(next(r for r in metrics if r.get("kind") == kind) for kind in ("train", "eval"))
        if name != "ce_renorm":
            export_checkpoint(run_dir, folder / f"{name}_hf", progress=False)
    return rows


@pytest.fixture(scope="module")
def runs(world) -> dict:
    return run_distributed(_train_and_export, 1, world)[0]


# ---- the independent references


def _hf(folder: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _real(batch: dict) -> torch.Tensor:
    """[B, S]: label index t + 1 below the sample's end (its largest segments entry)."""
    ends = torch.tensor([max(int(v) for v in row if v >= 0) for row in batch["segments"]])
    return torch.arange(1, SEQ_LEN + 1)[None] < ends[:, None]


def _batches(folder: Path, tokens: str, cache: str | None, *, slots: int, steps: int) -> list:
    """The micro-batches the trainer reads (pipeline/train/stream.py): steps 0..steps-1 of each of `slots`
    reader ranks, in order (RUN turns training's shuffle off; eval never shuffles)."""
    from pipeline.train.stream import make_dataset

    cfg = train_config(student_overrides(folder / "x", folder / tokens, **RUN))
    sets = [make_dataset(str(folder / tokens), str(folder / cache) if cache else "", cfg, rank=i, size=slots,
                         shuffle=False) for i in range(slots)]
    return [ds.batch(step) for step in range(steps) for ds in sets]


def _teacher_rows(folder: Path, cache: str, batch: dict, real: torch.Tensor) -> tuple:
    """(ids [n_real, K], log-probs [n_real, K], log rest [n_real]) of the batch's records, decoded by the codec
    at each sample's real positions only."""
    from pipeline.teacher.codec import TopkCodec

    record = json.loads((folder / cache / "manifest.json").read_text())["extra"]["targets"]
    rows = []
    for payload, mask in zip((s[f"teacher.{record['member']}"] for s in batch["sidecars"]), real):
        count = int(mask.sum())
        if count == 0:
            assert payload == b"", "a sample without a real label must have an empty record"
            continue
        ids, logprobs, log_rest = TopkCodec(VOCAB, K, count, record["value_bits"]).decode(payload)
        rows.append((torch.from_numpy(ids), torch.from_numpy(logprobs).double(), torch.from_numpy(log_rest).double()))
    return tuple(torch.cat(parts) for parts in zip(*rows))


def _reference(model, folder: Path, batches: list, cache: str | None, *, kl: bool) -> dict:
    """Per-real-token means over all `batches` of CE and (with `cache`) tail KL and top-1 agreement, and the
    gradient norm of the mean that is trained (KL with `kl`, else CE)."""
    model.zero_grad()
    sums = {"ce": 0.0, "kl": 0.0, "top1": 0.0}
    total = sum(int(_real(b).sum()) for b in batches)
    for batch in batches:
        real = _real(batch)
        tokens = batch["tokens"]
        log_q = model(input_ids=tokens[:, :-1]).logits.double().log_softmax(-1)[real]  # [n_real, V]
        ce = -log_q.gather(-1, tokens[:, 1:][real][:, None]).squeeze(-1)
        trained = ce
        sums["ce"] += float(ce.detach().sum())
        if cache:
            ids, logprobs, log_rest = _teacher_rows(folder, cache, batch, real)
            teacher = torch.cat([logprobs, log_rest[:, None]], -1)
            rows = divergence_rows("kl", teacher, _coarsen(log_q, ids), {})
            trained = rows if kl else ce
            sums["kl"] += float(rows.detach().sum())
            sums["top1"] += float((log_q.argmax(-1) == ids.gather(-1, logprobs.argmax(-1, keepdim=True))[:, 0]).sum())
        (trained.sum() / total).backward()
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))
    return {name: value / total for name, value in sums.items()} | {"grad_norm": norm, "tokens": total}


def _close(got: float, want: float, what: str, rtol: float = 1e-5) -> None:
    assert abs(got - want) <= rtol * abs(want) + 1e-7, f"{what}: the run reports {got!r}, the reference {want!r}"


def test_the_data_has_padding_and_a_sample_without_real_labels(world):
    batches = _batches(world, "heldout", None, slots=1, steps=EVAL_BATCHES)
    real = torch.cat([_real(b) for b in batches])
    assert 0.1 < 1 - float(real.float().mean()) < 0.5, "padding should be plentiful but not everything"
    assert (real.sum(-1) == 0).sum() == 1


def test_cache_holds_targets_for_real_labels_only(world):
    from pipeline.data.sources import ShardSet
    from pipeline.teacher.verify import verify_cache

    tokens = ShardSet(str(world / "heldout")).manifest
    for mode in ("topk", "sampled"):
        cache = world / f"cache_heldout_{mode}"
        manifest = json.loads((cache / "manifest.json").read_text())
        # a sample's real positions: its real tokens less one (the first token is no label)
        assert manifest["extra"]["positions"] == tokens.total_tokens - tokens.total_samples
        report = verify_cache(str(cache), str(world / "heldout"), teacher=str(world / "teacher"), positions=10_000,
                              progress=False)
        assert report["problems"] == [], report["problems"]
        assert report["positions_checked"] == manifest["extra"]["positions"]
        assert report.get("draws_reproduced", 1.0) == 1.0 and report.get("id_mismatch", 0.0) == 0.0


def test_reader_leaves_padding_empty_and_real_positions_exact(world):
    from pipeline.teacher.reader import CacheTargets

    teacher = _hf(world / "teacher")
    batch = _batches(world, "heldout", "cache_heldout_topk", slots=1, steps=1)[0]
    targets = CacheTargets(str(world / "cache_heldout_topk")).targets(batch)
    real = _real(batch)
    assert (targets.ids[~real] == -1).all() and (targets.ids[real] >= 0).all()
    with torch.no_grad():
        logp = teacher(input_ids=batch["tokens"][:, :-1]).logits.double().log_softmax(-1)
    assert torch.equal(targets.ids[real], logp.topk(K, dim=-1).indices.sort(dim=-1).values[real])


@pytest.mark.parametrize("name", ["ce_tail", "kl"])
def test_training_counts_real_tokens_only(world, runs, name):
    train_row, _ = runs[name]
    model = _hf(world / f"{name}_hf")
    cache = "cache_train_topk" if name == "kl" else None
    batches = _batches(world, "train", cache, slots=SLOTS, steps=1)
    counts = sorted(int(_real(b).sum()) for b in batches)
    assert counts[1] > 1.5 * counts[0] > 0, f"the micro-batches' real tokens {counts} should differ widely"
    ref = _reference(model, world, batches, cache, kl=name == "kl")
    _close(train_row["train/loss"], ref["kl" if name == "kl" else "ce"], f"{name} train/loss")
    _close(train_row["train/grad_norm"], ref["grad_norm"], f"{name} train/grad_norm", rtol=1e-4)
    assert train_row["data/consumed_tokens"] == ref["tokens"]


def test_eval_counts_real_tokens_only(world, runs):
    _, row = runs["ce_tail"]
    batches = _batches(world, "heldout", "cache_heldout_topk", slots=1, steps=EVAL_BATCHES)
    assert len({k for b in batches for k in b["keys"]}) == sum(HELDOUT), "eval reads every held-out sample once"
    model = _hf(world / "ce_tail_hf")
    ce = _reference(model, world, batches, None, kl=False)["ce"]  # the tokens alone first: no cache read
    _close(row["eval/loss"], ce, "eval/loss")
    _close(row["eval/perplexity"], math.exp(ce), "eval/perplexity")
    ref = _reference(model, world, batches, "cache_heldout_topk", kl=False)
    _close(row["eval/divergence"], ref["kl"], "eval/divergence")
    _close(row["eval/top1_agreement"], ref["top1"], "eval/top1_agreement")


def test_eval_is_one_ruler_for_tail_and_renorm_runs(runs):
    tail, renorm = runs["ce_tail"][1], runs["ce_renorm"][1]
    assert renorm["eval/loss"] == tail["eval/loss"], "same seed, CE training, lr 1e-30: the same weights"
    assert renorm["eval/divergence"] == tail["eval/divergence"]
    assert renorm["eval/top1_agreement"] == tail["eval/top1_agreement"]


def test_a_cache_of_the_previous_format_is_refused_by_name(world):
    """Version 1 records held padding positions too: read as version 2 they would misalign, so they are refused."""
    from pipeline.teacher.errors import CacheError
    from pipeline.teacher.reader import CacheTargets

    old = world / "cache_v1"
    old.mkdir()
    manifest = json.loads((world / "cache_heldout_topk" / "manifest.json").read_text())
    manifest["extra"]["targets"]["format_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"cache_v1/manifest.json: targets format 'distill-cache' v1 is not "
                                         r"distill-cache v2"):
        CacheTargets(str(old))

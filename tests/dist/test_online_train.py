"""The online teacher and on-policy prefixes, checked against independent computations at TP 1 and TP 2.

One worker (1 process, or 2 gloo processes for TP 2) runs two trainings built as `distill train` builds
them (`TrainingRun`) and steps them by hand:

- online: `teacher.online`, 5 steps of a word-level forward-KL phase on the corpus, then 3 steps with
  half teacher-sampled, half student-sampled prefixes. Before each of those the test decodes every row
  itself with `pipeline.generate.generate` from the weights the step starts from (the student's engine
  or the teacher model) and the keys `KEY@STEP`, and asserts that the rows the loss reads are prompt +
  those tokens + EOS padding, that the loss mask covers exactly the generated labels, and that the tokens
  are integer tensors outside any autograd graph; and that the online teacher was fed exactly the rows
  the loss read.
- reference: a fresh student of the same seed fed the online run's rows as data (nothing sampled), its
  targets computed here with `transformers`' model of the same teacher folder (logits padded to the
  student's vocabulary and cut to this rank's slice, as `DenseTargets`). Its losses equal the online
  run's to 1e-5 and its gradient norms to 1e-4 at all 8 steps: dense online KD is KD against the same
  teacher's logits, and an on-policy step's gradient is the loss's gradient on its rows as fixed tokens
  (nothing flows through, or is disturbed by, sampling).

The parent compares TP 2 with TP 1: the same generated tokens, losses within 1e-5.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.harness import run_distributed
from tests.modelmaker import make_hf_model
from tests.shardmaker import make_token_shards
from tests.trainkit import student_overrides, train_config

SEQ_LEN = 16
PROMPT = 4
DENSE_STEPS = 5
POLICY_STEPS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("online_train")
    make_token_shards(folder / "tokens", [16, 16], seq_len=SEQ_LEN, vocab_size=300, seed=0)
    make_hf_model("llama_gqa", folder / "teacher", seed=0)
    return folder


def _overrides(folder, name: str, tp: int, **extra) -> list[str]:
    return student_overrides(folder / f"{name}_tp{tp}", folder / "tokens", tp=tp, grad_accumulation=2,
                             loss__divergence="kl", teacher__online=folder / "teacher", **extra)


class HFTargets:
    """Dense targets computed with transformers' model of the teacher folder: [B, S, 300] logits, padded
    with zeros to the student's vocabulary and cut to this rank's slice."""

    def __init__(self, folder, local_vocab: int, tp_rank: int, tp_size: int):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.local_vocab, self.tp_rank, self.tp_size = local_vocab, tp_rank, tp_size

    @torch.no_grad()
    def targets(self, batch: dict, device):
        from pipeline.losses import DenseTargets

        logits = self.model(input_ids=batch["tokens"][:, :-1]).logits
        lo = self.tp_rank * self.local_vocab
        padded = torch.zeros(*logits.shape[:2], self.tp_size * self.local_vocab)
        padded[..., : logits.shape[-1]] = logits
        return DenseTargets(padded[..., lo: lo + self.local_vocab].to(device))


def _open(overrides: list[str]):
    from pipeline.parallel import ParallelContext
    from pipeline.train.run import TrainingRun

    cfg = train_config(overrides)
    ctx = ParallelContext.from_env(cfg.parallel.tp, cfg.parallel.backend, cfg.parallel.timeout_minutes)
    ctx.seed(cfg.seed)
    return TrainingRun(cfg, ctx)


def _close(run) -> None:
    run.stream.close()
    run.engine.destroy()
    run.ctx.destroy()


def _steps(run, batches: list) -> list[tuple[float, float]]:
    return [(r.values["loss"], r.grad_norm) for r in (run.student.run(b, step) for step, b in enumerate(batches))]


class Recorder:
    """Wraps a method, keeping a copy of its first positional argument of each call."""

    def __init__(self, method):
        self.method, self.seen = method, []

    def __call__(self, *args, **kwargs):
        self.seen.append(args[0].detach().clone() if torch.is_tensor(args[0]) else args[0])
        return self.method(*args, **kwargs)


def _expected_rows(run, batches: list, step: int) -> dict:
    """{(micro-batch, row): new tokens} decoded here for every generated row, from the current weights."""
    from pipeline.generate.decode import generate
    from pipeline.online.prefixes import assign_sources, phase_offset

    cfg = run.cfg
    prefixes = cfg.loss.prefixes
    eos = run.student.prefixes.eos_id
    out = {}
    for source, model in (("teacher", run.teacher.model), ("student", run.engine)):
        wanted = [(i, j) for i, b in enumerate(batches) for j, s in enumerate(
            assign_sources(len(b["keys"]), prefixes.fractions(), phase_offset(cfg.seed, step, b["keys"][0])))
            if s == source]
        prompts = [batches[i]["tokens"][j, :PROMPT].long() for i, j in wanted]
        keys = [f"{batches[i]['keys'][j]}@{step}" for i, j in wanted]
        new = generate(model, prompts, keys, prefixes.sampling, vocab_size=300, eos_id=eos, seed=cfg.seed,
                       group=run.ctx.tp_group, limits=[SEQ_LEN + 1 - PROMPT] * len(prompts)).tokens
        out.update({(i, j, source): t for (i, j), t in zip(wanted, new)})
    return out


def _check_rows(prepared: list, expected: dict, eos: int) -> None:
    seen = set()
    for (i, j, source), new in expected.items():
        batch = prepared[i]
        assert batch["sources"][j] == source
        row, end = batch["tokens"][j], PROMPT + len(new)
        assert torch.equal(row[PROMPT:end], new), (i, j, source)
        assert bool((row[end:] == eos).all())
        want = torch.zeros(SEQ_LEN, dtype=torch.bool)
        want[PROMPT - 1: end - 1] = True  # the positions whose label is a generated token
        assert torch.equal(batch["loss_mask"][j], want), (i, j, source)
        assert batch["segments"][j][:2].tolist() == [0, end] and bool((batch["segments"][j][2:] == -1).all())
        seen.add((i, j))
    assert seen == {(i, j) for i, b in enumerate(prepared) for j in range(len(b["keys"]))}, "a row not generated"
    for batch in prepared:
        tokens = batch["tokens"]
        assert tokens.dtype == torch.int64 and not tokens.requires_grad and tokens.grad_fn is None


def _worker(rank: int, world: int, folder) -> dict:
    """The online run (dense steps, then on-policy ones, checked as they go), then the reference run: a
    fresh student of the same seed fed the online run's rows as data, its targets from `HFTargets`."""
    overrides = _overrides(folder, "online", world, loss__phases=f"[{{steps: {DENSE_STEPS}, divergence: kl}}]",
                           loss__prefixes__teacher=0.5, loss__prefixes__student=0.5,
                           loss__prefixes__prompt_len=PROMPT)
    run = _open(overrides)
    fed = run.teacher.logits = Recorder(run.teacher.logits)
    prepare, read, online = run.student.prepare, [], []
    run.student.prepare = lambda micro, s: read.append(prepare(micro, s)) or read[-1]
    for step in range(DENSE_STEPS + POLICY_STEPS):
        batches = run.stream.next_step().micro_batches
        expected = _expected_rows(run, batches, step) if step >= DENSE_STEPS else None
        result = run.student.run(batches, step)
        if expected is None:
            assert read[-1] is batches  # the word-level phase reads the data as it is
        else:
            _check_rows(read[-1], expected, run.student.prefixes.eos_id)
        online.append((result.values["loss"], result.grad_norm))
    assert len(fed.seen) == 2 * len(read)  # one teacher forward per micro-batch
    for got, batch in zip(fed.seen, [b for step in read for b in step]):
        assert torch.equal(got.cpu(), batch["tokens"][:, :-1]), "the teacher scored other tokens than the loss"
    _close(run)
    run = _open([o.replace(f"online_tp{world}", f"reference_tp{world}") for o in overrides])  # another run_dir
    run.student.prefixes = None  # the rows as data: nothing is sampled
    weight = run.engine.module.output_layer.weight
    local_vocab = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions it; ds_shape is its slice's
    run.student.targets = HFTargets(folder / "teacher", local_vocab, run.ctx.tp_rank, run.ctx.tp_size)
    reference = _steps(run, read)
    _close(run)
    return {"online": online, "reference": reference, "tokens": [[b["tokens"] for b in step] for step in read]}


@pytest.mark.dist
def test_online_teacher_and_on_policy_prefixes_at_tp1_and_tp2(data):
    tp1 = run_distributed(_worker, 1, data)[0]
    tp2 = run_distributed(_worker, 2, data)
    for got in (tp1, *tp2):
        assert len(got["online"]) == DENSE_STEPS + POLICY_STEPS
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got["online"], got["reference"])):
            assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), f"step {step}"
            assert norm == pytest.approx(ref_norm, rel=1e-4), f"step {step}"
        losses = [loss for loss, _ in got["online"][:DENSE_STEPS]]
        assert losses[-1] < losses[0], "the dense KD phase did not learn"
    assert json.dumps(tp2[0]["online"]) == json.dumps(tp2[1]["online"])  # TP ranks report the same
    for one, two in zip(tp1["tokens"], tp2[0]["tokens"]):
        for a, b in zip(one, two):
            assert torch.equal(a, b), "TP 2 generated other tokens than TP 1"
    for step, (one, two) in enumerate(zip(tp1["online"], tp2[0]["online"])):
        assert two[0] == pytest.approx(one[0], rel=1e-5), f"step {step}"

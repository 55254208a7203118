"""The online teacher and on-policy prefixes, checked against independent computations at TP 1 and TP 2.

One worker runs four short trainings at the given TP size (1 process, or 2 gloo processes for TP 2),
each built as `distill train` builds it (`TrainingRun`) and stepped by hand:

- dense: 5 steps of forward KL on corpus prefixes with `teacher.online`, and 5 steps of the same student
  against targets computed here with `transformers`' model of the same teacher folder (its logits, padded
  to the student's vocabulary and cut to this rank's slice, as `DenseTargets`): the losses agree to 1e-5.
- on-policy: 3 steps with prefixes half teacher-sampled, half student-sampled. Before each step the test
  decodes every row itself with `pipeline.generate.generate` from the weights the step starts from
  (the student's engine or the teacher model) and the keys `KEY@STEP`, and asserts that the rows the loss
  reads are prompt + those tokens + EOS padding, that the loss mask covers exactly the generated labels,
  that the tokens are integer tensors outside any autograd graph, and that the online teacher was fed
  exactly those rows.
- fixed: a fresh student of the same seed trained on the captured rows as data (no sampling at all): its
  losses and gradient norms equal the on-policy run's, so the gradient is that of the loss on fixed tokens
  and nothing flows through, or is disturbed by, sampling.

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


def _steps(run, steps: int, batches=None) -> list[tuple[float, float]]:
    out = []
    for step in range(steps):
        micro = run.stream.next_step().micro_batches if batches is None else batches[step]
        result = run.student.run(micro, step)
        out.append((result.values["loss"], result.grad_norm))
    return out


def _dense(folder, tp: int) -> dict:
    run = _open(_overrides(folder, "online", tp))
    online = _steps(run, DENSE_STEPS)
    _close(run)
    run = _open(_overrides(folder, "hf", tp))
    weight = run.engine.module.output_layer.weight
    local_vocab = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions it; ds_shape is its slice's
    run.student.targets = HFTargets(folder / "teacher", local_vocab, run.ctx.tp_rank, run.ctx.tp_size)
    reference = _steps(run, DENSE_STEPS)
    _close(run)
    return {"online": online, "reference": reference}


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


def _on_policy(folder, tp: int) -> dict:
    policy = dict(loss__prefixes__teacher=0.5, loss__prefixes__student=0.5, loss__prefixes__prompt_len=PROMPT)
    run = _open(_overrides(folder, "policy", tp, **policy))
    fed = run.teacher.logits = Recorder(run.teacher.logits)
    prepare, captured, results = run.student.prepare, [], []
    run.student.prepare = lambda micro, s: captured.append(prepare(micro, s)) or captured[-1]
    for step in range(POLICY_STEPS):
        batches = run.stream.next_step().micro_batches
        expected = _expected_rows(run, batches, step)
        result = run.student.run(batches, step)
        _check_rows(captured[-1], expected, run.student.prefixes.eos_id)
        results.append((result.values["loss"], result.grad_norm))
    inputs = fed.seen
    assert len(inputs) == 2 * POLICY_STEPS  # one teacher forward per micro-batch
    for got, batch in zip(inputs, [b for step in captured for b in step]):
        assert torch.equal(got.cpu(), batch["tokens"][:, :-1]), "the teacher scored other tokens than the loss"
    _close(run)
    run = _open(_overrides(folder, "fixed", tp))  # data prefixes only: no sampler
    assert run.student.prefixes is None
    fixed = _steps(run, POLICY_STEPS, batches=captured)
    _close(run)
    tokens = [[b["tokens"] for b in step] for step in captured]
    return {"policy": results, "fixed": fixed, "tokens": tokens}


def _worker(rank: int, world: int, folder) -> dict:
    return {"dense": _dense(folder, world), "on_policy": _on_policy(folder, world)}


@pytest.mark.dist
def test_online_teacher_and_on_policy_prefixes_at_tp1_and_tp2(data):
    tp1 = run_distributed(_worker, 1, data)[0]
    tp2 = run_distributed(_worker, 2, data)
    for got in (tp1, *tp2):
        dense = got["dense"]
        assert len(dense["online"]) == DENSE_STEPS
        for (online, _), (reference, _) in zip(dense["online"], dense["reference"]):
            assert online == pytest.approx(reference, rel=1e-5, abs=1e-6)
        losses = [loss for loss, _ in dense["online"]]
        assert losses[-1] < losses[0], "the dense KD run did not learn"
        policy = got["on_policy"]
        for (loss, norm), (fixed_loss, fixed_norm) in zip(policy["policy"], policy["fixed"]):
            assert loss == pytest.approx(fixed_loss, rel=1e-6) and norm == pytest.approx(fixed_norm, rel=1e-6)
    assert json.dumps(tp2[0]["dense"]) == json.dumps(tp2[1]["dense"])  # TP ranks report the same
    for one, two in zip(tp1["on_policy"]["tokens"], tp2[0]["on_policy"]["tokens"]):
        for a, b in zip(one, two):
            assert torch.equal(a, b), "TP 2 generated other tokens than TP 1"
    for one, two in zip(tp1["on_policy"]["policy"], tp2[0]["on_policy"]["policy"]):
        assert two[0] == pytest.approx(one[0], rel=1e-5)
    for one, two in zip(tp1["dense"]["online"], tp2[0]["dense"]["online"]):
        assert two[0] == pytest.approx(one[0], rel=1e-5)

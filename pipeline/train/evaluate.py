"""Held-out evaluation: the student's perplexity, its KL divergence to the teacher, top-1 agreement, risks.

Every DP rank reads its own `eval.batches` micro-batches of the held-out shards, in a fixed order (no
shuffle), the same ones at every evaluation, so successive evaluations are comparable. Only the positions
the trainer counts count (`loss_positions`, through `StudentStep.losses`: a real label, so a bestfit
sample's padding is neither scored nor counted, and a set loss mask where a sample has one, so a generated
sequence's prompt is not scored); sums are weighted by those tokens and all-reduced over the DP group. The divergence reported is always the
forward KL(teacher ‖ student) on the cache's targets, decoded the same way for every run: top-K with
the rest bucket (`EVAL_SPARSE_MODE`, whatever the run's `loss.target_mode`), sampled as the plug-in
KL(p̂ ‖ q) with p̂ = counts/N (sampled targets have one reading only). Runs trained with different
divergences or target modes on one held-out cache are so measured with one ruler; figures from a top-K
and a sampled cache are different rulers and are not comparable.

With `eval.teacher` set, each evaluation also measures f-DISTILL's risks (`pipeline/eval/risks.py`):
eval/r_llh (the teacher's −log p over the student's samples) and eval/r_cvg (the student's −log q over
the teacher's samples) on the first `eval.risk_prompts` held-out samples, cut to `eval.prompt_len`
tokens, sampled with `eval.sampling` and seeded by the run's seed and each sample's key. The teacher is
loaded once, at the student's TP layout, frozen and outside DeepSpeed; its samples are drawn at the
first evaluation and reused (a fixed teacher with seeded draws would draw them again identically).

The CE and the KL come from one forward, through the logits or, with loss.fused_output, inside the output
layer as in training (fused_step.py).

Design choice: eval runs the same engine (under ZeRO-3 every rank gathers the same parameters in the
same order, so every DP rank does the same number of forwards); the cost is that eval time is not
spread over idle ranks: a rank with nothing left to read would still have to join the gathers. For
the risks, each DP rank takes its share of the prompts (every dp-th) and the sums are all-reduced over
the DP group: generation and scoring gather the student once per call (`generate.for_generation`), so
ranks whose rows stop at EOS after different numbers of steps hold no collective in between.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist

from pipeline.config import TrainConfig
from pipeline.parallel import ParallelContext
from pipeline.teacher.reader import CacheTargets
from pipeline.train.stream import TEACHER, make_dataset

EVAL_SPARSE_MODE = "tail"
"""How eval reads top-K targets in every run: the exact divergence of the K+1-outcome coarsenings."""


class Evaluator:
    """Evaluates a `StudentStep`'s engine on the held-out shards of `cfg.data`."""

    def __init__(self, cfg: TrainConfig, ctx: ParallelContext):
        self.cfg, self.ctx = cfg, ctx
        data = cfg.data
        self.dataset = make_dataset(data.eval_tokens, data.eval_teacher_cache, cfg, rank=ctx.dp_rank,
                                    size=ctx.dp_size, shuffle=False)
        self.targets = CacheTargets(data.eval_teacher_cache, prefix=TEACHER,
                                    sparse_mode=EVAL_SPARSE_MODE) if data.eval_teacher_cache else None
        self.risks = RiskEval(cfg, ctx) if cfg.eval.teacher else None
        self.batches = min(cfg.eval.batches, self.dataset.steps_per_epoch)
        if self.batches < cfg.eval.batches and ctx.rank == 0:
            warnings.warn(f"eval.batches={cfg.eval.batches} but {data.eval_tokens} holds only {self.batches} "
                          f"micro-batches per rank at dp={ctx.dp_size}; evaluating on {self.batches}")

    def run(self, step) -> dict:
        """eval/… scalars for the engine of `step` (a StudentStep); collective over the world."""
        engine = step.engine
        engine.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.ctx.device)  # ce, kl, top1, tokens
        self.dataset.load_state_dict(self.dataset.state_dict(0))
        stream = iter(self.dataset)
        try:
            with torch.no_grad():
                for _ in range(self.batches):
                    sums += self._one(step, next(stream))
        finally:
            stream.close()
            engine.train()
        if self.ctx.dp_size > 1:
            dist.all_reduce(sums, group=self.ctx.dp_group)
        tokens = max(float(sums[3]), 1.0)
        ce = float(sums[0]) / tokens
        out = {"eval/loss": ce, "eval/perplexity": math.exp(min(ce, 700.0))}
        if self.targets is not None:
            out["eval/divergence"] = float(sums[1]) / tokens
            out["eval/top1_agreement"] = float(sums[2]) / tokens
        if self.risks is not None:
            out.update(self.risks.run(engine))
        return out

    def _one(self, step, batch: dict) -> torch.Tensor:
        common = dict(tp_group=self.ctx.tp_group, vocab_size=self.cfg.model.vocab_size)
        calls = [(None, dict(divergence="ce", **common))]
        if self.targets is not None:
            calls.append((self.targets, dict(divergence="kl", temperature=self.targets.temperature, **common)))
        outs, _ = step.losses(batch, calls)  # one forward (inside the output layer with loss.fused_output)
        count = float(outs[0].num_tokens)
        row = [float(outs[0].ce) * count, 0.0, 0.0, count]
        if self.targets is not None:
            kl = outs[1]
            row[1], row[2] = float(kl.metrics["divergence"]) * count, float(kl.metrics["top1_agreement"]) * count
        return torch.tensor(row, dtype=torch.float64, device=self.ctx.device)


class RiskEval:
    """f-DISTILL's risks of the student against `eval.teacher`; see the module docstring."""

    def __init__(self, cfg: TrainConfig, ctx: ParallelContext):
        from pipeline.data.sources import ShardSet
        from pipeline.eval.risks import check_vocabularies, heldout_prompts
        from pipeline.model import load_model

        self.cfg, self.ctx = cfg, ctx
        self.teacher = load_model(cfg.eval.teacher, ctx, cfg.compute).eval().requires_grad_(False)
        check_vocabularies(cfg.model.vocab_size, self.teacher.model_config.vocab_size,
                           student="(model.vocab_size)", teacher=f"eval.teacher={cfg.eval.teacher}")
        self.prompts, self.keys = heldout_prompts(cfg.data.eval_tokens, cfg.eval.risk_prompts, cfg.eval.prompt_len,
                                                  rank=ctx.dp_rank, size=ctx.dp_size)
        self.eos_id = ShardSet(cfg.data.eval_tokens).manifest.eos_id
        self.teacher_samples = None

    def run(self, student) -> dict:
        """eval/r_llh and eval/r_cvg of `student` (the DeepSpeed engine: generation and scoring gather its
        parameters once per call); collective over the TP group and, for the pooled sums, the DP group."""
        from pipeline.eval.risks import risks, sample

        common = dict(vocab_size=self.cfg.model.vocab_size, eos_id=self.eos_id, seed=self.cfg.seed,
                      group=self.ctx.tp_group)
        if self.teacher_samples is None:
            self.teacher_samples = sample(self.teacher, self.prompts, self.keys, self.cfg.eval.sampling, **common)
        out = risks(student, self.teacher, self.prompts, self.keys, self.cfg.eval.sampling,
                    teacher_samples=self.teacher_samples, dp_group=self.ctx.dp_group, **common)
        return {"eval/r_llh": out["r_llh"], "eval/r_cvg": out["r_cvg"]}

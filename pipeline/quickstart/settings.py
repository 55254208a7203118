"""The quickstart's config (`distill quickstart`): corpus, the teacher's and the student's sizes and budgets.

Design choice: the quickstart has its own small config tree instead of a list of train and cache configs,
so a user changes one number (`student_run.steps=400`) and every student run follows; the stage configs
are derived from it (pipeline/quickstart/plan.py) and written next to the runs, where each can be rerun
by hand. The cost is a second vocabulary for settings the trainer already has, kept to the few a
first experiment turns. `SMOKE` is the one-minute scale-down a test runs, as plain overrides so the
resolved config shows exactly what it changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.config import at_least, in_range, positive, section, setting

AUSTEN = "data/austen"
TRAIN_BOOKS = ["sense_and_sensibility", "pride_and_prejudice", "mansfield_park", "emma", "northanger_abbey"]
HELDOUT_BOOKS = ["persuasion"]

TopKDivergence = Literal["kl", "rkl", "js", "tvd", "skew_kl", "skew_rkl"]

# `--smoke`: the same stages on one novel with tiny models (about a minute on 2 cores). A step of these models
# costs milliseconds next to each stage's start-up, so the runs take enough steps at a high learning rate to
# learn something a test can check: the teacher beats a unigram model counted on the training text.
SMOKE = [f"corpus.train=[{AUSTEN}/northanger_abbey.jsonl.gz]", "corpus.vocab_size=512", "corpus.seq_len=32",
         "teacher.hidden_size=32", "teacher.intermediate_size=64", "teacher.num_layers=1", "teacher.num_heads=2",
         "student.hidden_size=32", "student.intermediate_size=64", "student.num_layers=1", "student.num_heads=2",
         "teacher_run.steps=128", "teacher_run.lr=0.03", "teacher_run.micro_batch=4", "teacher_run.warmup_steps=2",
         "teacher_run.evals=1", "student_run.steps=48", "student_run.lr=0.03", "student_run.micro_batch=4",
         "student_run.warmup_steps=2", "student_run.evals=2",
         "cache.k=8", "cache.draws=8", "eval_batches=2", "teacher_sampled.prompt_len=8", "risks.prompts=4",
         "risks.prompt_len=8", "risks.max_new_tokens=8", "fdistill.prompt_len=8", "fdistill.max_new_tokens=8",
         "fdistill.predistill_steps=8"]


@dataclass(frozen=True)
class CorpusConfig:
    """The text the quickstart learns from, and how it becomes tokens."""

    train: list[str] = setting(
        [f"{AUSTEN}/{book}.jsonl.gz" for book in TRAIN_BOOKS],
        "Training text: files or globs (.txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet). The tokenizer, the teacher "
        "and the students all learn from these. A relative path is looked up in the current folder, then in the "
        "checkout. Default: five of the six Austen novels shipped in data/austen.", )
    heldout: list[str] = setting([f"{AUSTEN}/{book}.jsonl.gz" for book in HELDOUT_BOOKS],
                                 "Held-out text every model is evaluated on (default: Persuasion, a novel none of "
                                 "them trains on).")
    vocab_size: int = setting(4096, "Size of the byte-level BPE vocabulary trained on the training text.",
                              at_least(300))
    seq_len: int = setting(128, "Tokens per training sample.", positive)


@dataclass(frozen=True)
class ModelSizeConfig:
    """A Llama decoder's size; its vocabulary is corpus.vocab_size."""

    hidden_size: int = setting(128, "Width of the residual stream.", positive)
    intermediate_size: int = setting(352, "Width of the SwiGLU feed-forward layer.", positive)
    num_layers: int = setting(2, "Transformer layers.", positive)
    num_heads: int = setting(4, "Attention heads (must divide hidden_size).", positive)


@dataclass(frozen=True)
class TeacherSizeConfig(ModelSizeConfig):
    """The teacher's size: larger than the student's, and trained for longer."""

    hidden_size: int = setting(256, "Width of the residual stream.", positive)
    intermediate_size: int = setting(688, "Width of the SwiGLU feed-forward layer.", positive)
    num_layers: int = setting(4, "Transformer layers.", positive)
    num_heads: int = setting(4, "Attention heads (must divide hidden_size).", positive)


@dataclass(frozen=True)
class RunLengthConfig:
    """How long one training run is: steps of micro_batch samples on one process, warmup then cosine."""

    steps: int = setting(200, "Optimizer steps.", positive)
    micro_batch: int = setting(16, "Samples per step.", positive)
    lr: float = setting(3e-3, "Peak learning rate (AdamW), after linear warmup, decayed by a cosine to lr/10.",
                        positive)
    warmup_steps: int = setting(20, "Steps of linear warmup.", at_least(0))
    evals: int = setting(5, "Held-out evaluations spread over the run (the last at the end): the points of the "
                            "eval curves in the plot.", positive)


@dataclass(frozen=True)
class TeacherRunConfig(RunLengthConfig):
    """The teacher's plain next-token training run."""

    steps: int = setting(400, "Optimizer steps.", positive)


@dataclass(frozen=True)
class CacheTargetsConfig:
    """The sparse targets cached from the teacher."""

    k: int = setting(16, "Top-K ids per position, stored with the exact rest mass.", positive)
    draws: int = setting(50, "Draws per position of the sampled cache (the one sampled-target student).", positive)


@dataclass(frozen=True)
class TeacherSampledConfig:
    """One more student: forward KL along sequences the teacher sampled itself (f-DISTILL's KL)."""

    prompts: list[str] = setting(
        [f"{AUSTEN}/northanger_abbey.jsonl.gz"],
        "Text the prompts are cut from (one token sample each); the teacher continues every one once and the "
        "student reuses the continuations for its whole budget (f-DISTILL: sample once, same quality). One "
        "training novel keeps the sampling to about a minute on 2 cores; [] = no teacher-sampled student.")
    prompt_len: int = setting(32, "Tokens of each sample kept as the prompt; the teacher writes the rest.", positive)
    top_k: int = setting(
        0, "The teacher samples among its top_k ids at temperature 1; 0 = from its whole distribution. f-DISTILL "
           "used 30, but then no sampled sequence holds a token outside the teacher's 30 likeliest, the top-K "
           "targets give only the rest's total mass, and the student never learns the tail: in the smoke "
           "quickstart its held-out perplexity was 1083 with 30 against 217 with 0 (CE: 202).", at_least(0))


@dataclass(frozen=True)
class RisksConfig:
    """f-DISTILL's likelihood and coverage risks, measured at every student evaluation."""

    prompts: int = setting(32, "Held-out prompts student and teacher continue (top-k 30 at T = 1) at each "
                               "evaluation; 0 = no risk columns.", at_least(0))
    prompt_len: int = setting(32, "Tokens per prompt.", positive)
    max_new_tokens: int = setting(64, "Most tokens each continuation has.", positive)


@dataclass(frozen=True)
class FDistillConfig:
    """The fdistill recipe: f-DISTILL's four students, each along its own prefixes, scored by an online teacher."""

    prompt_len: int = setting(32, "Tokens of each training sample kept as the prompt the teacher or the student "
                                  "continues.", positive)
    max_new_tokens: int = setting(32, "Most tokens each continuation has (the loss counts these positions).",
                                  positive)
    top_k: int = setting(30, "Teacher and student sample their continuations among their top_k ids at T = 1 (30 "
                             "as f-DISTILL); 0 = from the whole distribution. The online teacher's targets are "
                             "dense, so the tail is taught whatever this is.", at_least(0))
    predistill_steps: int = setting(
        50, "Steps of word-level forward KL on the corpus before each student's own prefixes and divergence "
            "(f-DISTILL's pre-distillation; loss.phases): a random student's samples are noise a teacher cannot "
            "teach much along.", at_least(0))
    js_beta: float = setting(
        0.15, "loss.beta of the js student: M = βp + (1−β)q and β·KL(p‖M) + (1−β)·KL(q‖M), so 0.15 weighs the "
              "student's term by 0.85, as f-DISTILL's released code does.", in_range(0, 1, low_open=True,
                                                                                    high_open=True))


@dataclass(frozen=True)
class QuickstartConfig:
    """`distill quickstart`: tokenizer, token shards, a teacher, its caches, then one student per loss, compared."""

    seed: int = setting(1234, "Seed of everything; every student starts from the same weights and reads the same "
                              "samples in the same order.", at_least(0))
    recipe: Literal["compare", "fdistill"] = setting(
        "compare", "compare: one student per loss from the teacher's caches (corpus prefixes), plus the sampled, "
                   "pruned and teacher-sampled students. fdistill: f-DISTILL's sequence-level students with an "
                   "online teacher: kl on the teacher's samples, rkl on the student's own, js and tvd on half of "
                   "each (settings in `fdistill`), against the CE baseline.")
    corpus: CorpusConfig = section(CorpusConfig, "The text and its tokenization.")
    teacher: TeacherSizeConfig = section(TeacherSizeConfig, "The teacher's size.")
    teacher_run: TeacherRunConfig = section(TeacherRunConfig, "The teacher's training (labels only).")
    student: ModelSizeConfig = section(ModelSizeConfig, "The student's size (the same for every student run).")
    student_run: RunLengthConfig = section(RunLengthConfig, "Each student's training budget (the same for all).")
    cache: CacheTargetsConfig = section(CacheTargetsConfig, "The teacher's cached targets.")
    divergences: list[TopKDivergence] = setting(["kl", "rkl", "js", "tvd"],
                                     "One distilled student per divergence, from the top-K cache (tail mode) "
                                     "mixed with ce_weight of label CE; the CE-only student is always trained as "
                                     "the baseline.")
    ce_weight: float = setting(
        0.5, "Weight of the label cross-entropy in each top-K student's loss (loss.ce_weight). Top-K targets tell "
             "the student the teacher's K likeliest ids and the mass of the rest, not how that rest is spread over "
             "the other ids; the labels do. With 0 the top-K students match the teacher's head closely but never "
             "learn the tail, and their held-out perplexity is worse than CE's (measured: 327 against 190).",
        in_range(0, 1))
    kl_warmup_steps: int = setting(
        50, "Steps at the start of each rkl, js and tvd student that minimise forward KL to the same targets before "
           "switching to its divergence (loss.kl_warmup_steps). Their logit gradients scale with the student's "
           "own probability, so a student far from its teacher learns little from them where it under-predicts.",
        at_least(0))
    sampled: bool = setting(True, "Also train one student with forward KL alone on the sampled cache (unbiased "
                                  "for the whole distribution, tail included, so it needs no labels).")
    pruned: bool = setting(True, "Also train one student that starts as the teacher pruned to the student's size "
                                 "(`distill prune`: every other layer, MLP channels, heads and hidden channels "
                                 "ranked on 64 training samples) and then learns like the kl student.")
    teacher_sampled: TeacherSampledConfig = section(TeacherSampledConfig, "The student on the teacher's own samples.")
    risks: RisksConfig = section(RisksConfig, "Likelihood and coverage risks of every student.")
    fdistill: FDistillConfig = section(FDistillConfig, "The fdistill recipe's students.")
    eval_batches: int = setting(16, "Held-out micro-batches per evaluation.", positive)

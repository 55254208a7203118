"""The quickstart as a list of stages, each one ordinary `distill` command with its config written to a file.

Design choice: the quickstart adds no training or caching code of its own. It derives a train config per
run and a cache config per cache from the quickstart config, writes them under OUT/configs/, and runs
the same commands a user would type (OUT/commands.sh lists them), so what the demo shows is what the
pipeline does, and each stage can be rerun or changed by hand. The cost: every stage is a new process
(a few seconds of imports each).

The fdistill recipe (`recipe: fdistill`) keeps the tokenizer, shards, teacher and held-out cache stages and
trains f-DISTILL's four students with the exported teacher online (`fdistill_runs`) instead of the caches'.

Layout of OUT: tokenizer.json, data/{train,heldout,prompts}, runs/<name>/ (checkpoints, tensorboard,
metrics), teacher_hf/, cache/{train_topk,heldout_topk,train_sampled,train_teacher_sampled(/generated)},
student_pruned_hf/, student_hf/, configs/, logs/, results.{md,csv}, loss_curves.png.
"""
from __future__ import annotations

import glob
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.config import CacheConfig, ConfigError, TrainConfig, dump_yaml, from_dict
from pipeline.quickstart.settings import QuickstartConfig

CHECKOUT = Path(__file__).resolve().parents[2]
TEACHER = "teacher"
BASELINE = "ce"
SAMPLED = "kl_sampled"
TEACHER_SAMPLED = "kl_teacher"
PRUNED = "kl_pruned"
PRUNED_FOLDER = "student_pruned_hf"


@dataclass
class Stage:
    """One step of the quickstart: a `distill` command, the config files it reads, what it is for."""

    name: str
    title: str
    args: list[str] | Callable[[], list[str]]
    configs: dict[Path, str] = field(default_factory=dict)

    def command(self) -> list[str]:
        """The full command line (resolved now: a stage may depend on earlier stages' results)."""
        args = self.args() if callable(self.args) else self.args
        return [sys.executable, "-m", "pipeline", *args]


@dataclass(frozen=True)
class StudentRun:
    """One student of the comparison: its run name, its loss and the cache it learns from."""

    name: str
    divergence: str
    cache: str  # "" for the CE baseline
    label: str
    ce_weight: float = 0.0
    kl_warmup_steps: int = 0
    tokens: str = "data/train"  # its token shards, relative to OUT
    init: str = ""  # the folder under OUT its weights start from (model.init); "" = random from the seed
    online: bool = False  # scored by the online teacher (the exported teacher) instead of a cache
    extra_loss: tuple = ()  # more loss-section items: (key, value) pairs (prefixes, phases, beta)

    def loss(self) -> dict:
        """The run's loss section."""
        return {"divergence": self.divergence, "ce_weight": self.ce_weight, "kl_warmup_steps": self.kl_warmup_steps,
                **dict(self.extra_loss)}


def resolve_inputs(patterns: list[str], key: str) -> list[str]:
    """Each pattern's files, sorted; a relative pattern matching nothing here is tried in the checkout."""
    files = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) or ([] if Path(pattern).is_absolute()
                                               else sorted(glob.glob(str(CHECKOUT / pattern))))
        if not found:
            raise ConfigError(key, f"{pattern!r} matches no file here or in {CHECKOUT}")
        files += found
    return files


FDISTILL_PREFIXES = {"kl": {"teacher": 1.0}, "rkl": {"student": 1.0}, "js": {"teacher": 0.5, "student": 0.5},
                     "tvd": {"teacher": 0.5, "student": 0.5}}
"""f-DISTILL's prefix sources per divergence: KL along the teacher's samples, RKL along the student's, JS and
TVD along half of each."""


def fdistill_runs(cfg: QuickstartConfig) -> list[StudentRun]:
    """The CE baseline and f-DISTILL's four students, each scored by the online teacher along its prefixes."""
    fd = cfg.fdistill
    sampling = {"top_k": fd.top_k, "max_new_tokens": fd.max_new_tokens}
    pre = min(fd.predistill_steps, cfg.student_run.steps - 1)
    runs = [StudentRun(BASELINE, "ce", "", "CE on labels (baseline)")]
    for name, sources in FDISTILL_PREFIXES.items():
        prefixes = {**sources, "prompt_len": fd.prompt_len, "sampling": sampling}
        extra = [("prefixes", prefixes)]
        if pre:
            extra.append(("phases", [{"steps": pre, "divergence": "kl"}]))
        if name == "js":
            extra.append(("beta", fd.js_beta))
        where = " and ".join(f"{share:g} {source}" for source, share in sources.items())
        label = (f"{name.upper()} along {where} samples" if len(sources) > 1 else
                 f"{name.upper()} along the {next(iter(sources))}'s samples")
        runs.append(StudentRun(f"fd_{name}", name, "", label + (f", after {pre} steps of word-level KL" if pre else ""),
                               online=True, extra_loss=tuple(extra)))
    return runs


def student_runs(cfg: QuickstartConfig) -> list[StudentRun]:
    """The CE baseline, one top-K student per divergence, and the sampled-target student (the fdistill recipe:
    `fdistill_runs`)."""
    if cfg.recipe == "fdistill":
        return fdistill_runs(cfg)
    runs = [StudentRun(BASELINE, "ce", "", "CE on labels (baseline)")]
    mix = f" + {cfg.ce_weight:g}·CE" if cfg.ce_weight else ""
    for name in cfg.divergences:
        warm = 0 if name == "kl" else min(cfg.kl_warmup_steps, cfg.student_run.steps)
        after = f", after {warm} steps of KL" if warm else ""
        runs.append(StudentRun(name, name, "train_topk", f"{name.upper()} to top-{cfg.cache.k}{mix}{after}",
                               cfg.ce_weight, warm))
    if cfg.sampled:
        runs.append(StudentRun(SAMPLED, "kl", "train_sampled", f"KL to {cfg.cache.draws} samples"))
    if cfg.pruned:
        runs.append(StudentRun(PRUNED, "kl", "train_topk", f"KL to top-{cfg.cache.k}{mix}, from the pruned teacher",
                               cfg.ce_weight, init=PRUNED_FOLDER))
    if cfg.teacher_sampled.prompts:
        runs.append(StudentRun(TEACHER_SAMPLED, "kl", "train_teacher_sampled",
                               f"KL to top-{cfg.cache.k}{mix} along the teacher's samples", cfg.ce_weight,
                               tokens="cache/train_teacher_sampled/generated"))
    return runs


def build_plan(cfg: QuickstartConfig, out: Path, *, workers: int = 2,
               pick_student: Callable[[], str] | None = None) -> list[Stage]:
    """Every stage in order. `pick_student()` names the run whose student is exported (called when due)."""
    out = out.resolve()
    train_files = resolve_inputs(cfg.corpus.train, "corpus.train")
    heldout_files = resolve_inputs(cfg.corpus.heldout, "corpus.heldout")
    tokenizer, data = out / "tokenizer.json", out / "data"
    stages = [
        Stage("tokenizer", f"train a {cfg.corpus.vocab_size}-token BPE tokenizer on {len(train_files)} files",
              ["tokenize", "train-tokenizer", "--input", *train_files, "--vocab-size", str(cfg.corpus.vocab_size),
               "--out", str(tokenizer)]),
        _shard_stage("shards_train", "training", train_files, tokenizer, data / "train", cfg, workers),
        _shard_stage("shards_heldout", "held-out", heldout_files, tokenizer, data / "heldout", cfg, workers),
        _train_stage(cfg, out, TEACHER, {"divergence": "ce"}, "", "the teacher on labels (plain next-token CE)"),
        Stage("teacher_export", "export the teacher as a Hugging Face folder",
              ["export", "--checkpoint", str(out / "runs" / TEACHER), "--out", str(out / "teacher_hf"),
               "--force"]),
        *([] if cfg.recipe == "fdistill" else [_cache_stage(cfg, out, "train_topk", "train", "topk")]),
        _cache_stage(cfg, out, "heldout_topk", "heldout", "topk"),
    ]
    if cfg.recipe == "fdistill":
        return stages + _student_stages(cfg, out, pick_student)
    if cfg.sampled:
        stages.append(_cache_stage(cfg, out, "train_sampled", "train", "sampled"))
    if cfg.teacher_sampled.prompts:
        prompt_files = resolve_inputs(cfg.teacher_sampled.prompts, "teacher_sampled.prompts")
        stages += [_shard_stage("shards_prompts", "prompt", prompt_files, tokenizer, data / "prompts", cfg, workers),
                   _cache_stage(cfg, out, "train_teacher_sampled", "prompts", "topk")]
    if cfg.pruned:
        stages.append(_prune_stage(cfg, out))
    return stages + _student_stages(cfg, out, pick_student)


def _student_stages(cfg: QuickstartConfig, out: Path, pick_student: Callable[[], str] | None) -> list[Stage]:
    """One training stage per student run, then the export of the best one."""
    stages = [_train_stage(cfg, out, run.name, run.loss(), run.cache, f"student: {run.label}", run.tokens, run.init,
                           run.online) for run in student_runs(cfg)]
    pick = pick_student or (lambda: BASELINE)
    stages.append(Stage("student_export", "export the best distilled student as a Hugging Face folder",
                        lambda: ["export", "--checkpoint", str(out / "runs" / pick()), "--out",
                                 str(out / "student_hf"), "--force"]))
    return stages


def _shard_stage(name: str, what: str, files: list[str], tokenizer: Path, folder: Path, cfg: QuickstartConfig,
                 workers: int) -> Stage:
    return Stage(name, f"pack the {what} text into {cfg.corpus.seq_len}-token samples",
                 ["tokenize", "shard", "--input", *files, "--tokenizer", str(tokenizer), "--out", str(folder),
                  "--seq-len", str(cfg.corpus.seq_len), "--workers", str(min(workers, len(files)))])


def _prune_stage(cfg: QuickstartConfig, out: Path) -> Stage:
    """The teacher cut to the students' size: their layers, widths and attention width (the teacher's
    head width is kept, so the pruned model has student.hidden_size / head width heads)."""
    head_dim = cfg.teacher.hidden_size // cfg.teacher.num_heads
    heads = cfg.student.hidden_size // head_dim
    if heads < 1 or cfg.student.hidden_size % head_dim:
        raise ConfigError("pruned", f"the teacher's heads are {head_dim} wide; student.hidden_size="
                                    f"{cfg.student.hidden_size} must be a multiple of that to prune the teacher to it")
    size = cfg.student
    return Stage("prune", f"prune the teacher to {size.num_layers} layers, hidden {size.hidden_size}, MLP "
                          f"{size.intermediate_size}, {heads} heads",
                 ["prune", "--teacher", str(out / "teacher_hf"), "--tokens", str(out / "data" / "train"),
                  "--samples", "64", "--num-layers", str(size.num_layers), "--hidden-size", str(size.hidden_size),
                  "--intermediate-size", str(size.intermediate_size), "--num-heads", str(heads),
                  "--out", str(out / PRUNED_FOLDER), "--force"])


def _train_stage(cfg: QuickstartConfig, out: Path, name: str, loss: dict, cache: str, title: str,
                 tokens: str = "data/train", init: str = "", online: bool = False) -> Stage:
    path = out / "configs" / f"train_{name}.yaml"
    settings = train_settings(cfg, out, name, loss, cache, tokens, init, online)
    return Stage(name, f"train {title}, {settings.schedule.steps} steps", ["train", "--config", str(path)],
                 {path: dump_yaml(settings)})


def train_settings(cfg: QuickstartConfig, out: Path, name: str, loss: dict, cache: str,
                   tokens: str = "data/train", init: str = "", online: bool = False) -> TrainConfig:
    """The train config of one quickstart run (the teacher when name is TEACHER); `loss` its loss section,
    `tokens` its token shards relative to OUT (the teacher-generated ones for the teacher-sampled student),
    `init` the folder under OUT its weights start from (the pruned teacher; its architecture is then the
    checkpoint's), `online` whether the exported teacher scores it online (teacher.online)."""
    teacher = name == TEACHER
    size, run = (cfg.teacher, cfg.teacher_run) if teacher else (cfg.student, cfg.student_run)
    every = max(1, run.steps // run.evals)
    return from_dict(TrainConfig, {
        "seed": cfg.seed, "run_dir": str(out / "runs" / name),
        "data": {"tokens": str(out / tokens), "teacher_cache": str(out / "cache" / cache) if cache else "",
                 "eval_tokens": str(out / "data" / "heldout"),
                 "eval_teacher_cache": "" if teacher else str(out / "cache" / "heldout_topk"),
                 "tokenizer": str(out / "tokenizer.json"), "num_workers": 0},
        "model": {"vocab_size": cfg.corpus.vocab_size, "max_position_embeddings": cfg.corpus.seq_len,
                  **({"init": str(out / init)} if init else {
                      "hidden_size": size.hidden_size, "intermediate_size": size.intermediate_size,
                      "num_layers": size.num_layers, "num_heads": size.num_heads})},
        "compute": {"vocab_multiple": 64},
        "loss": loss,
        **({"teacher": {"online": str(out / "teacher_hf")}} if online else {}),
        "optim": {"lr": run.lr, "min_lr": run.lr / 10, "warmup_steps": run.warmup_steps},
        "schedule": {"steps": run.steps, "micro_batch": run.micro_batch},
        "checkpoint": {"every": every, "keep": 1},
        "eval": {"every": every, "batches": cfg.eval_batches, **({} if teacher else _risk_settings(cfg, out))},
        "log": {"console_every": max(1, run.steps // 10)},
    })


def _risk_settings(cfg: QuickstartConfig, out: Path) -> dict:
    """The eval settings that measure a student's risks against the exported teacher (none when off)."""
    risks = cfg.risks
    if not risks.prompts:
        return {}
    return {"teacher": str(out / "teacher_hf"), "risk_prompts": risks.prompts, "prompt_len": risks.prompt_len,
            "sampling": {"top_k": 30, "max_new_tokens": risks.max_new_tokens}}


def _cache_stage(cfg: QuickstartConfig, out: Path, name: str, split: str, mode: str) -> Stage:
    path = out / "configs" / f"cache_{name}.yaml"
    generated = split == "prompts"
    prefixes = {"source": "teacher", "prompt_len": cfg.teacher_sampled.prompt_len,
                "sampling": {"top_k": cfg.teacher_sampled.top_k}} if generated else {}
    settings = from_dict(CacheConfig, {
        "seed": cfg.seed, "teacher": str(out / "teacher_hf"), "tokens": str(out / "data" / split),
        "output": str(out / "cache" / name), "micro_batch": 16, "prefixes": prefixes,
        "compute": {"vocab_multiple": 64}, "targets": {"mode": mode, "k": cfg.cache.k, "draws": cfg.cache.draws}})
    what = f"top-{cfg.cache.k} + rest mass" if mode == "topk" else f"{cfg.cache.draws} sampled draws"
    where = "along its own continuations of the prompt shards" if generated else f"for the {split} shards"
    return Stage(f"cache_{name}", f"cache the teacher's {what} {where}",
                 ["cache", "--config", str(path)], {path: dump_yaml(settings)})

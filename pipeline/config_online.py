"""The config sections of generation and of the online teacher: sampling, prefix sources, the loss schedule.

They are part of the one config tree rooted in pipeline/config.py (which re-exports every class here), kept
in a module of their own so that each file stays readable; they depend only on the tree's machinery.
Design choice and cost as in pipeline/config.py: frozen sections validated once at load time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from pipeline.config_tree import ConfigError, in_range, non_negative, positive, section, setting

DivergenceName = Literal["kl", "rkl", "js", "tvd", "skew_kl", "skew_rkl", "ce"]


@dataclass(frozen=True)
class SamplingConfig:
    """How a model picks each next token when it generates (`distill generate`, teacher-sampled caches, risks)."""

    mode: Literal["sample", "greedy"] = setting(
        "sample", "sample = draw from softmax(logits/temperature), restricted by top_k and top_p; greedy = the "
                  "most likely id (temperature, top_k and top_p unused).")
    temperature: float = setting(1.0, "T dividing the logits before the softmax the draws come from.", positive)
    top_k: int = setting(0, "Draw only among the k most likely ids (renormalised); 0 = no limit. f-DISTILL "
                            "sampled its prefixes with top_k 30.", non_negative)
    top_p: float = setting(1.0, "Nucleus: draw only among the most likely ids whose mass first reaches top_p "
                                "(after top_k); 1 = no limit.", in_range(0, 1, low_open=True))
    max_new_tokens: int = setting(128, "Most tokens generated per prompt; generation stops earlier at EOS.",
                                  positive)


@dataclass(frozen=True)
class OnPolicySamplingConfig(SamplingConfig):
    """How the online teacher or the student continues a prompt during training: `SamplingConfig` with
    f-DISTILL's settings (top_k 30 at temperature 1) as the defaults."""

    top_k: int = setting(30, "Draw only among the k most likely ids (renormalised); 0 = no limit. 30 is what "
                             "f-DISTILL sampled its prefixes with.", non_negative)


@dataclass(frozen=True)
class PrefixSourcesConfig:
    """Where the prefixes the loss is computed along come from, as fractions of every micro-batch's samples.

    data: the token samples as they are (word-level distillation). teacher: each sample's first prompt_len
    tokens continued by the online teacher (teacher.online), or the offline teacher-sampled shards of
    `distill cache` used as data. student: the same prompts continued by the student as it trains
    (on-policy). The loss counts the generated positions; the teacher scores exactly those tokens."""

    data: Optional[float] = setting(None, "Fraction of each micro-batch's samples trained on as they are; null = "
                                          "the rest, 1 − teacher − student.", in_range(0, 1))
    teacher: float = setting(0.0, "Fraction continued by the online teacher (needs teacher.online).",
                             in_range(0, 1))
    student: float = setting(0.0, "Fraction continued by the student itself, on-policy (needs teacher.online: "
                                  "only an online teacher can score the student's samples).", in_range(0, 1))
    prompt_len: int = setting(32, "teacher/student: tokens of each sample used as its prompt (all the real tokens "
                                  "of a shorter padded sample); at most seq_len.", positive)
    loss_on: Literal["generated", "all"] = setting(
        "generated", "teacher/student: positions a generated sample's loss counts: generated = those whose label "
                     "is a generated token; all = every real position (prompt labels too).")
    sampling: OnPolicySamplingConfig = section(
        OnPolicySamplingConfig, "teacher/student: how a prompt is continued: up to min(max_new_tokens, seq_len + 1 "
                                "− prompt_len) new tokens, stopping at EOS; draws seeded by (seed, sample key, "
                                "optimizer step).")

    def __post_init__(self) -> None:
        if self.data is None and self.teacher + self.student > 1.0 + 1e-9:
            raise ConfigError("teacher", f"teacher + student = {self.teacher + self.student:.6g} exceeds 1 (data takes "
                                         "the rest, 1 − teacher − student)")
        total = self.data_fraction + self.teacher + self.student
        if abs(total - 1.0) > 1e-9:
            raise ConfigError("data", f"the fractions data + teacher + student must sum to 1, got "
                                      f"{self.data} + {self.teacher} + {self.student} = {total:.6g}")

    @property
    def data_fraction(self) -> float:
        return 1.0 - self.teacher - self.student if self.data is None else self.data

    def fractions(self) -> dict[str, float]:
        return {"data": max(self.data_fraction, 0.0), "teacher": self.teacher, "student": self.student}

    @property
    def generates(self) -> bool:
        return self.teacher > 0 or self.student > 0


@dataclass(frozen=True)
class PhaseConfig:
    """One phase of the loss schedule: `steps` optimizer steps with their own divergence and prefix sources."""

    steps: int = setting(1, "Optimizer steps of this phase.", positive)
    divergence: Optional[DivergenceName] = setting(None, "The divergence of this phase; null = loss.divergence.")
    prefixes: PrefixSourcesConfig = section(PrefixSourcesConfig, "The prefix sources of this phase.")


@dataclass(frozen=True)
class OnlineTeacherConfig:
    """A teacher run beside the student (`teacher.online`): it scores every micro-batch on the spot."""

    online: str = setting(
        "", "Teacher model (a Hugging Face folder, or a TP checkpoint split for this run's tp and "
            "compute.vocab_multiple), loaded once per run at the student's TP layout, frozen, not ZeRO-partitioned, "
            "in compute.dtype (bf16 on CUDA). Its logits are dense targets, never gathered. Needed for generated "
            "prefixes (loss.prefixes); excludes data.teacher_cache. Empty = no online teacher.")
    hidden_weight: float = setting(
        0.0, "Weight of the intermediate-state loss added to the loss: the distance between chosen teacher and "
             "student layers' hidden states (through a learned linear map when the widths differ). 0 = off.",
        non_negative)
    hidden_loss: Literal["mse", "cosine"] = setting(
        "mse", "Distance of the intermediate-state loss: mse (mean squared error per element) or cosine (1 − "
               "cosine similarity per position).")
    student_layers: list[int] = setting(
        [], "Student layers (1-based output of that layer; 0 = the embedding) whose hidden states are matched; "
            "empty = the last layer. Pairs with teacher_layers item by item.", non_negative)
    teacher_layers: list[int] = setting(
        [], "Teacher layers matched with student_layers, item by item; empty = the last layer.", non_negative)

    def __post_init__(self) -> None:
        if len(self.student_layers) != len(self.teacher_layers):
            raise ConfigError("teacher_layers", f"pairs with student_layers item by item: got "
                                                f"{len(self.teacher_layers)} teacher and {len(self.student_layers)} "
                                                "student layers")

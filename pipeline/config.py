"""The pipeline's config sections: one frozen dataclass per section, under the root `RunConfig`.

Each setting declares its default, its documentation and its constraint in one place (`setting`),
so a YAML file, `distill config --reference` and the README's config reference all come from these
classes (the generation and online-teacher sections live in pipeline/config_online.py, re-exported here).
The machinery that fills them from YAML and overrides lives in pipeline/config_tree.py and is
re-exported here, so callers import everything config from this module. A new section is one frozen
dataclass here plus one `section(...)` field on `RunConfig` (or on the root class of its job).

Design choice: sections are frozen, so the config a run logs and checkpoints is the config it ran
with; nothing mutates it halfway. The cost: a changed value means a new object
(`dataclasses.replace`), and that path skips validation unless it goes through `from_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Optional

from pipeline.config_tree import (COMMAND_LINE, Check, ConfigError, at_least, config_reference, config_to_dict,
                                  dump_yaml, from_dict, greater_than, in_range, load_config, non_negative,
                                  positive, section, setting)
from pipeline.config_online import (DivergenceName, OnlineTeacherConfig, OnPolicySamplingConfig, PhaseConfig,
                                    PrefixSourcesConfig, SamplingConfig)

__all__ = ["COMMAND_LINE", "CacheConfig", "Check", "CheckpointConfig", "ComputeConfig", "ConfigError", "DivergenceName",
           "EvalConfig", "LogConfig", "LossConfig", "ModelConfig", "OnPolicySamplingConfig", "OnlineTeacherConfig",
           "OptimizerConfig", "ParallelConfig", "PhaseConfig", "PrefixConfig", "PrefixSourcesConfig",
           "RiskSamplingConfig", "RunConfig", "SamplingConfig", "ScheduleConfig", "StudentModelConfig",
           "TargetsConfig", "TeacherSamplingConfig", "TrainConfig", "TrainDataConfig",
           "at_least", "config_reference", "config_to_dict", "dump_yaml", "from_dict", "greater_than", "in_range",
           "load_config", "non_negative", "positive", "section", "setting"]

@dataclass(frozen=True)
class ParallelConfig:
    """How the processes of one job are laid out: world = dp × tp."""

    tp: int = setting(1, "Tensor-parallel size: ranks that split each layer and the vocabulary. dp is derived at "
                         "run time as world size / tp. Larger tp fits a bigger model per rank at the price of "
                         "collectives in every layer.", at_least(1))
    backend: Literal["auto", "gloo", "nccl"] = setting(
        "auto", "torch.distributed backend. auto = nccl when CUDA is available, else gloo (the CPU "
                "development and CI platform).")
    timeout_minutes: float = setting(30, "How long a collective may wait before the job fails (fractions allowed, "
                                         "0.5 = 30 s). Too short kills jobs during slow checkpoints; too long "
                                         "lets a hung rank hold the allocation.", positive)


@dataclass(frozen=True)
class LossConfig:
    """The distillation loss: (1 − ce_weight)·T²·D(teacher ‖ student) + ce_weight·CE."""

    divergence: DivergenceName = setting(
        "kl", "D between teacher p and student q. kl = KL(p‖q): mass-covering, the standard. rkl = KL(q‖p): "
              "mode-seeking. js: generalised Jensen-Shannon (see beta), bounded, between the two. tvd: total "
              "variation, bounded, weak on small probabilities. skew_kl / skew_rkl: KL against a mixture (see "
              "alpha), smoother gradients. ce: cross-entropy with the hard labels only, no teacher.")
    temperature: float = setting(
        1.0, "T, dividing teacher and student logits before the softmax. Above 1 flattens both, so the "
             "teacher's tail weighs more, at the price of a weaker signal on its top tokens. Cached sparse "
             "targets must be used at the temperature they were made at.", positive)
    ce_weight: float = setting(
        0.0, "Weight of the hard-label cross-entropy against the divergence: 0 is pure distillation, 1 "
             "ignores the teacher. Some label loss can steady a student that starts far from its teacher.",
        in_range(0, 1))
    beta: float = setting(
        0.5, "js weight: β·KL(p‖M) + (1−β)·KL(q‖M) with M = βp + (1−β)q. 0.5 is the symmetric Jensen-Shannon "
             "divergence; at either end it vanishes, hence the open interval. Used by js only.",
        in_range(0, 1, low_open=True, high_open=True))
    alpha: float = setting(
        0.1, "Skew of skew_kl = KL(p ‖ αp + (1−α)q) and skew_rkl = KL(q ‖ αq + (1−α)p). 0 recovers kl / rkl; "
             "larger values bound the divergence and its gradients but weaken the signal. Used by skew_kl and "
             "skew_rkl only.", in_range(0, 1, high_open=True))
    chunk_size: Optional[int] = setting(
        None, "Token rows the loss processes at a time; null picks it so that one chunk's vocabulary-wide "
              "temporary is about 32 MiB. Smaller lowers peak memory; larger means fewer kernel launches "
              "and collectives.", positive)
    fused_output: bool = setting(
        True, "Compute the loss inside the output layer from its hidden states and weight slice "
              "(distill_linear_loss), so the [tokens, vocabulary] logits and their gradient never exist: the "
              "loss's working memory was 0.07-0.11x the logits' size instead of 1.9x, at 0.98-1.05x the unfused "
              "loss's time (benchmarks/README.md, N=8192, H=1024, V=32000 and 128256, TP 1 and 2, CPU). Same "
              "losses and gradients up to summation order. false computes the logits and calls distill_loss.")
    kl_warmup_steps: int = setting(
        0, "Optimizer steps at the start that minimise forward KL instead of `divergence` (same targets, "
           "temperature and ce_weight), then switch. rkl, js and tvd give a logit gradient proportional to the "
           "student's own probability, so a student far from its teacher learns little from them where it "
           "under-predicts; a short KL phase brings it near first. 0: `divergence` from the first step.",
        at_least(0))
    target_mode: Literal["tail", "renorm"] = setting(
        "tail", "How sparse top-k teacher targets are compared. tail adds a rest-of-vocabulary bucket to both "
                "sides: the exact divergence of the coarsened distributions, a lower bound of the full one. "
                "renorm renormalises both over the k ids: the common but biased practice, for comparison.")
    prefixes: PrefixSourcesConfig = section(
        PrefixSourcesConfig, "Where the prefixes come from (f-DISTILL: kl on teacher samples, rkl on student "
                             "samples, js and tvd on both halves). Generated prefixes need teacher.online.")
    phases: list[PhaseConfig] = setting(
        [], "A schedule run before the main loss: each phase trains `steps` steps with its own divergence and "
            "prefixes (e.g. a word-level pre-distillation phase: {steps: 200, divergence: kl}); after the last "
            "phase, divergence and prefixes above apply. The step counter is checkpointed, so a resumed run "
            "continues in the same phase.")

    def __post_init__(self) -> None:
        if self.kl_warmup_steps and self.divergence == "ce":
            raise ConfigError("kl_warmup_steps", "needs a teacher: divergence is ce (labels only); set it to 0")
        if self.kl_warmup_steps and self.phases:
            raise ConfigError("kl_warmup_steps", "and phases both schedule the start of the run; express the KL "
                                                 "warm-up as the first phase ({steps: N, divergence: kl}) instead")

    def phase_at(self, step: int) -> tuple[str, PrefixSourcesConfig]:
        """(divergence, prefixes) of optimizer step `step` (0-based): the phase it falls in, else the main ones."""
        for phase in self.phases:
            if step < phase.steps:
                return phase.divergence or self.divergence, phase.prefixes
            step -= phase.steps
        return self.divergence, self.prefixes

    @property
    def all_prefixes(self) -> list[PrefixSourcesConfig]:
        return [self.prefixes, *(phase.prefixes for phase in self.phases)]

    def divergence_params(self) -> dict[str, float]:
        """The divergence-specific keyword arguments `distill_loss` takes for this divergence."""
        if self.divergence == "js":
            return {"beta": self.beta}
        if self.divergence in ("skew_kl", "skew_rkl"):
            return {"alpha": self.alpha}
        return {}


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder's architecture: the fields of a Hugging Face config.json, under our names."""

    architecture: Literal["llama", "qwen2", "mistral"] = setting(
        "llama", "Model family, which fixes the Hugging Face class written on export: llama "
                 "(LlamaForCausalLM), qwen2 (Qwen2ForCausalLM, has QKV bias) or mistral (MistralForCausalLM).")
    vocab_size: int = setting(32000, "Token ids the model scores: the tokenizer's vocabulary size. Padded at run "
                                     "time to a multiple of compute.vocab_multiple × tp; padded ids get no "
                                     "probability.", positive)
    hidden_size: int = setting(512, "Width of the residual stream (H).", positive)
    intermediate_size: int = setting(1408, "Width of the SwiGLU feed-forward layer.", positive)
    num_layers: int = setting(8, "Transformer layers.", positive)
    num_heads: int = setting(8, "Query heads; tp must divide it.", positive)
    num_kv_heads: Optional[int] = setting(
        None, "Key/value heads (grouped-query attention); null means num_heads (plain multi-head). Must divide "
              "num_heads; tp must divide it or be a multiple of it.", positive)
    head_dim: Optional[int] = setting(None, "Width of one head; null means hidden_size / num_heads.", positive)
    rope_theta: float = setting(10000.0, "Base period of the rotary position embedding.", positive)
    rope_scaling: Literal["none", "llama3", "linear"] = setting(
        "none", "Rotary frequency scaling for long context: llama3 (Llama 3.1+ smooth per-frequency scaling "
                "with the rope_* factors below), linear (positions divided by rope_factor) or none.")
    rope_factor: float = setting(8.0, "Scaling factor of rope_scaling (unused with none).", at_least(1))
    rope_low_freq_factor: float = setting(1.0, "llama3 scaling: wavelengths above original/low are divided by "
                                               "rope_factor.", positive)
    rope_high_freq_factor: float = setting(4.0, "llama3 scaling: wavelengths below original/high are kept.",
                                           positive)
    rope_original_max_positions: int = setting(8192, "llama3 scaling: the context length the model was "
                                                     "pretrained at.", positive)
    norm_eps: float = setting(1e-5, "Epsilon of every RMSNorm.", positive)
    tie_embeddings: bool = setting(False, "Share the input embedding with the output layer (no lm_head tensor).")
    qkv_bias: bool = setting(False, "Bias on the query, key and value projections (true for qwen2).")
    sliding_window: Optional[int] = setting(
        None, "Mistral-style sliding-window attention: each token sees at most this many positions back "
              "(itself included); null for full causal attention.", positive)
    max_position_embeddings: int = setting(4096, "Longest sequence the model is declared for (recorded on "
                                                 "export; rotary embeddings have no table to outgrow).", positive)
    init_std: float = setting(0.02, "Standard deviation of the normal initialisation of a new model.", positive)

    def __post_init__(self) -> None:
        kv_heads = self.kv_heads
        if self.num_heads % kv_heads:
            raise ConfigError("num_kv_heads", f"must divide num_heads={self.num_heads}, got {kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError("head_dim", f"is null, so num_heads={self.num_heads} must divide "
                                          f"hidden_size={self.hidden_size}; set head_dim explicitly")
        if self.head_size % 2:
            raise ConfigError("head_dim", f"must be even for rotary embeddings, got {self.head_size}")
        if self.architecture == "qwen2" and not self.qkv_bias:
            raise ConfigError("qkv_bias", "qwen2 models have QKV bias; set qkv_bias: true")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim


@dataclass(frozen=True)
class StudentModelConfig(ModelConfig):
    """The student's architecture, and the checkpoint it may start from (`init`)."""

    init: str = setting(
        "", "Start from these weights instead of a random initialisation from seed: a Hugging Face folder or a TP "
            "checkpoint (`distill convert hf-to-tp`), loaded at any tp straight into ZeRO-3 partitions. The "
            "architecture comes from the checkpoint: every other model field left at its default takes the "
            "checkpoint's value, and one set to another value must equal it (a difference is an error naming the "
            "field). Ignored when the run resumes from its own run_dir/checkpoints/latest. Empty = random init.")

    def architecture_config(self) -> ModelConfig:
        """The plain ModelConfig (every field but `init`)."""
        return ModelConfig(**{spec.name: getattr(self, spec.name) for spec in fields(ModelConfig)})


@dataclass(frozen=True)
class ComputeConfig:
    """How a model is computed on this job's devices; none of it changes the architecture or the weights."""

    attention: Literal["auto", "sdpa", "flash"] = setting(
        "auto", "Attention kernel. flash = flash-attn (CUDA, fp16/bf16, needs the gpu extra); sdpa = torch's "
                "scaled_dot_product_attention (everywhere); auto = flash when installed and usable, else sdpa.")
    document_masking: bool = setting(
        False, "Stop attention at document boundaries inside a packed sample, and restart positions at each "
               "document, so each document is computed as if alone. Costs a mask per sample with sdpa.")
    dtype: Literal["auto", "float32", "bfloat16"] = setting(
        "auto", "Parameter and activation dtype. auto = bfloat16 on CUDA, float32 on CPU. Reductions over the "
                "vocabulary stay in float32 whatever this is.")
    vocab_multiple: int = setting(
        128, "The vocabulary is padded to a multiple of vocab_multiple × tp, for kernel-friendly shapes and an "
             "even split over tensor-parallel ranks.", positive)


@dataclass(frozen=True)
class RiskSamplingConfig(SamplingConfig):
    """How student and teacher sample for the risks (eval, `distill eval`): f-DISTILL's top-k 30 at T = 1."""

    top_k: int = setting(30, "Draw only among the k most likely ids (renormalised); 0 = no limit. 30 is what "
                             "f-DISTILL sampled with for its risks and prefixes.", non_negative)
    max_new_tokens: int = setting(64, "Most tokens generated per prompt; generation stops earlier at EOS.",
                                  positive)


@dataclass(frozen=True)
class RunConfig:
    """The loss sections alone (`distill config --kind loss`): the process layout and the loss, as a training
    run reads them; no command runs from it, so it has no run-wide settings such as a seed."""

    parallel: ParallelConfig = section(ParallelConfig, "Process layout: tensor and data parallelism.")
    loss: LossConfig = section(LossConfig, "The distillation loss and its divergence.")


@dataclass(frozen=True)
class TargetsConfig:
    """What the teacher cache stores for each position: a sparse stand-in for the teacher's distribution."""

    mode: Literal["topk", "sampled"] = setting(
        "topk", "topk = the K most likely ids with their true full-vocabulary log-probs and the exact log rest "
                "mass (use with loss.target_mode tail). sampled = N draws with replacement stored as distinct "
                "ids and counts: an unbiased forward-KL target, about 12 distinct ids per position at N=50.")
    k: int = setting(32, "topk: ids kept per position. More ids tighten the coarsened divergence towards the full "
                         "one at about log2(V/K)+2 bits per id plus the value bits.", positive)
    draws: int = setting(50, "sampled: draws per position (N). The stored target is counts/N.", positive)
    temperature: float = setting(
        1.0, "T of the teacher's softmax the targets come from. The student's loss.temperature must equal it.",
        positive)
    value_bits: Optional[int] = setting(
        None, "topk: bits per stored probability (ratio to the position's top, cube-root companded; the error "
              "of each ratio is at most 1.5/(2^bits − 1)). null = the most bits, between 4 and 8, that keep a "
              "position's ids and values within 1.5× the information floor log2 C(V, K).", in_range(1, 16))


@dataclass(frozen=True)
class TeacherSamplingConfig(SamplingConfig):
    """How the teacher samples the continuations of a teacher-sampled cache: `SamplingConfig` with f-DISTILL's
    settings (top_k 30 at temperature 1) as the defaults."""

    top_k: int = setting(30, "Draw only among the k most likely ids (renormalised); 0 = no limit. 30 is what "
                             "f-DISTILL sampled its teacher prefixes with.", non_negative)


@dataclass(frozen=True)
class PrefixConfig:
    """Where the prefixes the teacher's targets are computed along come from: the token shards as they are, or
    continuations the teacher samples from a prompt taken from each token sample (f-DISTILL's KL, SeqKD)."""

    source: Literal["data", "teacher"] = setting(
        "data", "data = the token samples themselves (the plain cache). teacher = each sample's first prompt_len "
                "tokens, continued by the teacher (sampling), written as new token shards to `generated` with a "
                "loss mask, and the targets computed along those generated sequences.")
    prompt_len: int = setting(
        32, "teacher: tokens of each token sample used as its prompt (all of a shorter padded sample's real "
            "tokens). Must be at most seq_len, so that at least one token is generated.", positive)
    loss_on: Literal["generated", "all"] = setting(
        "generated", "teacher: positions the generated samples' mask counts in the loss: generated = those whose "
                     "label is a generated token; all = every real position (prompt labels too).")
    sampling: TeacherSamplingConfig = section(
        TeacherSamplingConfig, "teacher: how the teacher continues each prompt. It generates up to "
                               "min(max_new_tokens, seq_len + 1 − prompt_len) tokens, stopping at EOS.")


@dataclass(frozen=True)
class CacheConfig:
    """The offline teacher-cache job (`distill cache`): one cache shard per token shard, same keys."""

    seed: int = setting(1234, "Seed of the sampled targets' draws (with each sample's key); the same seed, teacher "
                              "and data write the same bytes.", non_negative)
    teacher: str = setting("", "The teacher: a Hugging Face folder (config.json + safetensors) or a TP checkpoint "
                               "from `distill convert hf-to-tp`. Required.")
    tokens: str = setting("", "The token-shard folder (from `distill tokenize`) the teacher reads. Required.")
    output: str = setting("", "Folder for the cache shards and manifest. A rerun into it completes only the "
                              "missing shards; a folder made by another teacher or config is refused. Required.")
    generated: str = setting("", "prefixes.source teacher: folder for the generated token shards (the student's "
                                 "data.tokens beside this cache); empty = OUTPUT/generated.")
    micro_batch: int = setting(4, "Samples per teacher forward. Larger is faster until memory runs out; the "
                                  "logits of a batch take micro_batch × seq_len × V/tp × 4 bytes.", positive)
    progress: bool = setting(True, "Show a progress bar (on the first rank) and print a summary at the end.")
    parallel: ParallelConfig = section(ParallelConfig, "Process layout: tp ranks per teacher replica; the "
                                                       "replicas (world / tp) split the shards between them.")
    compute: ComputeConfig = section(ComputeConfig, "How the teacher is computed (attention kernel, dtype, "
                                                    "document masking: use the student's setting).")
    targets: TargetsConfig = section(TargetsConfig, "What is stored per position.")
    prefixes: PrefixConfig = section(PrefixConfig, "Which prefixes the targets are computed along: the token "
                                                   "shards' (data) or the teacher's own samples (teacher).")


@dataclass(frozen=True)
class TrainDataConfig:
    """What the student reads: token shards, the teacher cache joined to them, held-out shards."""

    tokens: str = setting("", "Token-shard folder (from `distill tokenize`) to train on. Required.")
    teacher_cache: str = setting(
        "", "Teacher cache folder (from `distill cache`) made from exactly these token shards; its keys are joined "
            "to the tokens and checked. Empty = no teacher: plain next-token training (loss.divergence must be ce).")
    eval_tokens: str = setting("", "Held-out token shards for eval; empty = no eval.")
    eval_teacher_cache: str = setting("", "Teacher cache of the held-out shards, for eval's divergence and top-1 "
                                          "agreement; empty = perplexity only.")
    tokenizer: str = setting("", "The tokenizer (tokenizer.json or its folder). Optional: when set it is checked "
                                 "against the shards' fingerprint and copied into exported models.")
    shuffle: bool = setting(True, "Shuffle shards and samples (a pure function of seed and epoch).")
    shuffle_window: int = setting(256, "Samples shuffled together; larger mixes better, costs memory per reader.",
                                  positive)
    num_workers: int = setting(1, "Data-loader processes per rank that read and decode ahead of the step; 0 reads "
                                  "in the training process.", non_negative)
    verify: bool = setting(False, "Check every shard's sha256 when first opened (a full read of it).")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay, as DeepSpeed runs it."""

    lr: float = setting(3e-4, "Peak learning rate, reached at the end of warmup.", positive)
    min_lr: float = setting(3e-5, "Learning rate at the last step, where the cosine ends.", non_negative)
    warmup_steps: int = setting(100, "Optimizer steps of linear warmup from lr/warmup_steps to lr.", non_negative)
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay.", non_negative)
    beta1: float = setting(0.9, "AdamW β1.", in_range(0, 1, high_open=True))
    beta2: float = setting(0.95, "AdamW β2.", in_range(0, 1, high_open=True))
    eps: float = setting(1e-8, "AdamW ε.", positive)
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this; 0 turns clipping off.", non_negative)


@dataclass(frozen=True)
class ScheduleConfig:
    """How long the run is and how a step is made of micro-batches."""

    steps: int = setting(1000, "Optimizer steps of the whole run (the cosine schedule ends here).", positive)
    micro_batch: int = setting(4, "Samples per rank per forward pass.", positive)
    grad_accumulation: int = setting(1, "Micro-batches per optimizer step on each rank. Global batch = micro_batch "
                                        "× grad_accumulation × dp. The sample order depends only on micro_batch "
                                        "and grad_accumulation × dp, so 1 rank × 8 equals 8 ranks × 1.", positive)
    max_nonfinite_steps: int = setting(10, "Steps whose loss or gradient is NaN or inf are skipped and counted; "
                                           "the run stops with an error when the count exceeds this.", non_negative)


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written and how many are kept (under run_dir/checkpoints)."""

    every: int = setting(500, "Save every this many steps (and at the end, and on preemption); 0 = only then.",
                         non_negative)
    keep: int = setting(3, "Keep the newest this many complete checkpoints; older ones are deleted.", positive)


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: perplexity, divergence to the teacher, top-1 agreement, and f-DISTILL's risks."""

    every: int = setting(500, "Evaluate every this many steps (and at the end); 0 = only at the end.", non_negative)
    batches: int = setting(16, "Micro-batches per rank per evaluation (the same ones every time).", positive)
    teacher: str = setting(
        "", "Teacher model for the risks (a Hugging Face folder, or a TP checkpoint split for this run's tp and "
            "compute.vocab_multiple): each eval also logs eval/r_llh (−log p_teacher over the student's samples; "
            "high = mode averaging) and eval/r_cvg (−log q_student over the teacher's samples; high = mode "
            "collapse) on prompts from data.eval_tokens. Loaded once per run, frozen. Empty = no risks.")
    risk_prompts: int = setting(
        32, "Held-out samples whose first prompt_len tokens are the risks' prompts: the first ones of "
            "data.eval_tokens, in total (not per rank; every DP rank generates for all of them, see docs/train.md).",
        positive)
    prompt_len: int = setting(16, "Tokens of each risk prompt; at most the samples' sequence length.", positive)
    sampling: RiskSamplingConfig = section(RiskSamplingConfig, "How student and teacher sample their continuations "
                                                               "for the risks (seeded by the run's seed and each "
                                                               "sample's key).")


@dataclass(frozen=True)
class LogConfig:
    """What a person watching the run sees."""

    console_every: int = setting(10, "Print a console line every this many steps (rank 0).", positive)
    tensorboard: bool = setting(True, "Write TensorBoard events under run_dir/tensorboard (rank 0).")
    progress: bool = setting(True, "Console lines and the end-of-run summary; off for quiet runs.")


@dataclass(frozen=True)
class TrainConfig:
    """The student trainer (`distill train`): DeepSpeed ZeRO-3 over the data-parallel ranks, optional TP."""

    seed: int = setting(1234, "Seed of the initial weights and the data order; the same seed, config and data "
                              "repeat a run bit for bit at any data-parallel size.", non_negative)
    run_dir: str = setting("", "Folder of this run: checkpoints/, tensorboard/, metrics.jsonl, config.yaml. Running "
                               "again with the same run_dir resumes from checkpoints/latest. Required.")
    data: TrainDataConfig = section(TrainDataConfig, "The training and held-out data.")
    model: StudentModelConfig = section(StudentModelConfig, "The student's architecture, and the checkpoint it "
                                                            "starts from (model.init; empty: initialised from "
                                                            "seed).")
    compute: ComputeConfig = section(ComputeConfig, "How the student is computed (dtype, attention, document "
                                                    "masking).")
    parallel: ParallelConfig = section(ParallelConfig, "Process layout: world = dp × tp; ZeRO-3 shards over dp.")
    loss: LossConfig = section(LossConfig, "The distillation loss.")
    teacher: OnlineTeacherConfig = section(OnlineTeacherConfig, "An online teacher beside the student (instead of "
                                                                "data.teacher_cache).")
    optim: OptimizerConfig = section(OptimizerConfig, "Optimizer and learning-rate schedule.")
    schedule: ScheduleConfig = section(ScheduleConfig, "Steps and batch sizes.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints.")
    eval: EvalConfig = section(EvalConfig, "Held-out evaluation.")
    log: LogConfig = section(LogConfig, "Console and TensorBoard.")
    deepspeed: dict = setting({}, "Keys merged last into the generated DeepSpeed config (nested mappings merge key "
                                  "by key), e.g. {zero_optimization: {stage3_prefetch_bucket_size: 5e7}}. The "
                                  "generated config is written to run_dir/deepspeed.json.")

"""Builds a Llama-family decoder as a megatron-core `GPTModel` whose logits stay split over the vocabulary.

The layer is megatron-core's own `TransformerLayer` with its tensor-parallel pieces (fused QKV
`ColumnParallelLinear`, `RowParallelLinear` projections, gated `MLP` for SwiGLU, `VocabParallelEmbedding`
and a column-parallel output layer), assembled from a spec written here rather than megatron's stock
specs, so three parts can be ours: RMSNorm computed as Hugging Face computes it (float32 statistics),
the core attention of `attention.py`, and the CPU-capable rotary embedding of `rotary.py`. Nothing in
the installed megatron-core is patched; the rotary module is swapped on the built model instance.

`LlamaGPT.forward(tokens, document_ids=None)` returns `[B, S, Vl]` logits for this TP rank's slice of
the padded vocabulary (`ParallelContext.vocab_range`), ready for `distill_loss`. With `output_fn`, the
output layer (`OutputLayer`, swapped onto the built instance like the rotary module) computes no logits:
it hands its hidden states and weight slice to `output_fn` (a fused loss) inside its own forward, so
ZeRO-3's hooks on that module gather its weight and handle its gradient as they do for the logits.

Design choice: megatron-core's own initialisation is switched off and `init.py` draws every weight
from a generator seeded by its name, so a new model is the same at every TP size and device for one
seed (the student trainer's TP=1-equals-TP=2 check relies on it); the cost is a full-size temporary
per weight at build time, which is why an import builds with `initialize=False` and fills the
slices from the checkpoint instead. Switching it off also skips where megatron marks its TP-split weights
`tensor_model_parallel`, so `mark_tensor_parallel` marks them here: DeepSpeed's global gradient norm (and
so gradient clipping) counts a weight without the mark on TP rank 0 only.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from pipeline.config import ComputeConfig, ModelConfig
from pipeline.model.attention import Backend, CoreAttention, document_starts, resolve_backend
from pipeline.model import init as weight_init
from pipeline.model.layout import check_tp
from pipeline.model.rotary import RotaryEmbedding
from pipeline.parallel import ParallelContext


class RMSNorm(nn.Module):
    """RMSNorm with float32 statistics and the weight applied in the input dtype, as Hugging Face does."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                              device="cpu" if config.use_cpu_initialization else "cuda"))

    def forward(self, hidden: Tensor) -> Tensor:
        as_float = hidden.float()
        normed = as_float * torch.rsqrt(as_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(hidden.dtype)


def compute_dtype(compute: ComputeConfig, device: torch.device) -> torch.dtype:
    """The parameter dtype `compute.dtype` means on `device`."""
    if compute.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, compute.dtype)


def transformer_config(cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype) -> TransformerConfig:
    """megatron-core's TransformerConfig for `cfg` at this job's TP size, every fusion off, and no
    initialisation: weights come from `init.py` or a checkpoint."""
    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_heads, num_query_groups=cfg.kv_heads, kv_channels=cfg.head_size,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=cfg.qkv_bias,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=cfg.init_std,
        tensor_model_parallel_size=ctx.tp_size, sequence_parallel=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        use_cpu_initialization=ctx.device.type == "cpu", perform_initialization=False,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        cuda_graph_scope=[],  # megatron's default "full" is a deprecated spelling of the same thing
    )


def layer_spec(cfg: ModelConfig, backend: Backend) -> TransformerBlockSubmodules:
    """The block spec: megatron's TransformerLayer with our norm and core attention, then a final RMSNorm."""
    attention = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                           submodules=SelfAttentionSubmodules(
                               linear_qkv=ColumnParallelLinear,
                               core_attention=ModuleSpec(module=CoreAttention, params={
                                   "backend": backend, "sliding_window": cfg.sliding_window}),
                               linear_proj=RowParallelLinear, q_layernorm=IdentityOp, k_layernorm=IdentityOp))
    mlp = ModuleSpec(module=MLP, params={"ffn_hidden_size": cfg.intermediate_size},
                     submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    layer = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=RMSNorm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=RMSNorm, mlp=mlp, mlp_bda=get_bias_dropout_add))
    return TransformerBlockSubmodules(layer_specs=[layer] * cfg.num_layers, layer_norm=RMSNorm)


def document_positions(document_ids: Tensor) -> Tensor:
    """Positions `[B, S]` restarting at 0 at each document start (documents are contiguous runs of one id)."""
    batch, seq_len = document_ids.shape
    index = torch.arange(seq_len, device=document_ids.device).expand(batch, seq_len)
    start_of = torch.where(document_starts(document_ids), index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_of


class LlamaGPT(GPTModel):
    """megatron-core GPTModel for a Llama-family config: vocab-parallel logits, optional document masking."""

    def __init__(self, cfg: ModelConfig, compute: ComputeConfig, ctx: ParallelContext, *,
                 seed: Optional[int] = None):
        device = ctx.device
        check_tp(cfg, ctx.tp_size, device.type)
        dtype = compute_dtype(compute, device)
        self.model_config, self.compute_config = cfg, compute
        self.attention_backend = resolve_backend(compute.attention, device, dtype)
        self.padded_vocab = ctx.padded_vocab_size(cfg.vocab_size, compute.vocab_multiple)
        super().__init__(config=transformer_config(cfg, ctx, dtype),
                         transformer_layer_spec=layer_spec(cfg, self.attention_backend),
                         vocab_size=self.padded_vocab, max_sequence_length=cfg.max_position_embeddings,
                         parallel_output=True, share_embeddings_and_output_weights=cfg.tie_embeddings,
                         position_embedding_type="rope", rotary_base=int(cfg.rope_theta))
        self.rotary_pos_emb = RotaryEmbedding(cfg).to(device)
        self.output_layer.__class__ = OutputLayer  # same weights and state dict; adds the output_fn route
        mark_tensor_parallel(self)
        if seed is not None:
            weight_init.initialize(self, seed, ctx.tp_size, ctx.tp_rank)

    def document_ids(self, segments: Tensor, seq_len: int) -> Optional[Tensor]:
        """Document ids for `forward` from a batch's segment starts when `compute.document_masking` is on,
        else None (attention then runs across the documents packed into a sample)."""
        if not self.compute_config.document_masking:
            return None
        return document_ids_from_segments(segments.to(self.embedding.word_embeddings.weight.device), seq_len)

    def forward(self, tokens: Tensor, document_ids: Optional[Tensor] = None, positions: Optional[Tensor] = None,
                *, output_fn: Optional[OutputFn] = None, **unused):
        """`[B, S, Vl]` logits of this TP rank's vocabulary slice for tokens `[B, S]`, or what `output_fn`
        returns when given (see `OutputLayer`).

        With `document_ids` `[B, S]` (equal within a document, see `document_ids_from_segments`),
        attention stops at document boundaries and positions restart at each document. `positions`
        `[B, S]` gives each token's rotary position instead (incremental decoding: the new tokens of
        left-padded rows); it excludes `document_ids`.
        """
        if unused:
            raise TypeError(f"LlamaGPT.forward takes tokens, document_ids and positions, not {sorted(unused)}")
        if positions is not None and document_ids is not None:
            raise TypeError("LlamaGPT.forward takes document_ids or positions, not both")
        if positions is None and document_ids is not None:
            positions = document_positions(document_ids)
        self.rotary_pos_emb.set_positions(positions)
        self.output_layer.output_fn = output_fn
        try:
            # given labels, megatron returns compute_language_model_loss(labels, output), which passes
            # output_fn's result through (below); the tokens only stand in for labels it does not read
            return super().forward(input_ids=tokens, position_ids=positions, attention_mask=document_ids,
                                   labels=None if output_fn is None else tokens)
        finally:
            self.rotary_pos_emb.set_positions(None)
            self.output_layer.output_fn = None

    def compute_language_model_loss(self, labels: Tensor, logits):
        if self.output_layer.output_fn is not None:
            return logits  # output_fn's result, returned by the output layer in place of the logits
        return super().compute_language_model_loss(labels, logits)


OutputFn = Callable[[Tensor, Tensor], object]
"""`output_fn(hidden, weight)`: hidden `[S, B, H]` (sequence first, as megatron's layers hold it), weight
`[Vl, H]` this TP rank's vocabulary slice (the embedding's when tied); returns a tensor or a list, tuple or
dict of tensors (the structures in which ZeRO-3 finds the tensors to hook its backward on)."""


class OutputLayer(ColumnParallelLinear):
    """megatron's column-parallel output layer; while `output_fn` is set, its forward returns
    `(output_fn(hidden, weight), None)` instead of `(logits, None)`.

    `hidden` is the input after `copy_to_tensor_model_parallel_region`, whose backward all-reduces the
    input's gradient over the TP group (the all-reduce megatron's linear does in its own backward), so
    `output_fn`'s hidden-state gradient is this rank's share only, as `distill_linear_loss`'s is.
    """

    output_fn: Optional[OutputFn] = None

    def forward(self, input_: Tensor, weight: Optional[Tensor] = None, runtime_gather_output: Optional[bool] = None):
        if self.output_fn is None:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        hidden = copy_to_tensor_model_parallel_region(input_, group=self.tp_group)
        return self.output_fn(hidden, self.weight if weight is None else weight), None


def mark_tensor_parallel(model: nn.Module) -> None:
    """Mark every TP-split weight of `model` as megatron-core would have (`tensor_model_parallel`, its
    `partition_dim` and `partition_stride`).

    megatron sets these attributes on a weight only inside its own initialisation, which
    `perform_initialization=False` skips (biases get them regardless). DeepSpeed reads them for the global
    gradient norm (`is_model_parallel_parameter`): a weight without them counts as replicated, so only TP
    rank 0's slice entered the norm, and at TP > 1 both train/grad_norm and gradient clipping were wrong.
    Replicated weights (the RMSNorms) stay unmarked and are counted once, on TP rank 0.
    """
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)  # a tied output layer has none of its own
        if weight is None or hasattr(weight, "tensor_model_parallel"):
            continue
        # the fused [gate_r; up_r] of a gated MLP interleaves two matrices: megatron's stride 2
        stride = 2 if name.endswith("mlp.linear_fc1") and module.config.gated_linear_unit else 1
        set_tensor_model_parallel_attributes(weight, True, dim, stride)


def document_ids_from_segments(segments: Tensor, seq_len: int) -> Tensor:
    """Document ids `[B, seq_len]` from the data reader's segment starts `[B, S]` (−1 padded).

    Positions from one start up to the next share an id; positions past the sample's end (never the
    case for packed samples) continue the last document.
    """
    index = torch.arange(seq_len, device=segments.device)
    starts = torch.where(segments < 0, torch.full_like(segments, seq_len + 1), segments)
    return (index[None, :, None] >= starts[:, None, :]).sum(-1) - 1


def build_model(cfg: ModelConfig, compute: ComputeConfig, ctx: ParallelContext, *, initialize: bool = True,
                seed: Optional[int] = None) -> LlamaGPT:
    """A new model on `ctx.device`, this rank's TP slices only.

    With `initialize`, weights are drawn by `init.py` from `seed` (default: torch's current seed, as
    set by `ctx.seed`), identical at every TP size; without, they are left for a caller that fills
    every tensor (an import).
    """
    if initialize and seed is None:
        seed = torch.initial_seed()
    return LlamaGPT(cfg, compute, ctx, seed=seed if initialize else None)

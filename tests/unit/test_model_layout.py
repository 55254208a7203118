"""The pure Hugging Face <-> megatron tensor mapping of pipeline/model/layout.py, without processes.

For several configs (MHA, GQA, a single kv head, QKV bias, tied embeddings, a vocabulary that is not
a multiple of 128) and every TP size check_tp allows on CUDA (so kv < tp layouts are covered too):
every rank's shard from a dict-backed reader inverts exactly back to the original random tensors,
shard shapes are what megatron builds, the fused QKV shard holds the right heads in megatron's
order, padded vocabulary rows are zero, and check_tp's errors name the setting.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ComputeConfig, ModelConfig
from pipeline.model.errors import ModelLayoutError
from pipeline.model.layout import check_tp, hf_from_shards, hf_shapes, shard_from_hf, tensor_rules
from pipeline.parallel import ParallelContext, pad_vocab_size

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)
CONFIGS = {
    "mha": ModelConfig(**BASE),
    "gqa": ModelConfig(**BASE, num_kv_heads=2),
    "kv1": ModelConfig(**BASE, num_kv_heads=1),
    "qkv_bias": ModelConfig(**BASE, num_kv_heads=2, architecture="qwen2", qkv_bias=True),
    "tied": ModelConfig(**BASE, num_kv_heads=2, tie_embeddings=True),
    "heads8_kv2": ModelConfig(**{**BASE, "num_heads": 8}, num_kv_heads=2, qkv_bias=True),
    "vocab256": ModelConfig(**{**BASE, "vocab_size": 256}, num_kv_heads=2),
}
TPS = (1, 2, 4)


def _cases(configs=CONFIGS):
    cases = []
    for name, cfg in configs.items():
        for tp in TPS:
            try:
                check_tp(cfg, tp, "cuda")
            except ModelLayoutError:
                continue
            cases.append(pytest.param(name, tp, id=f"{name}-tp{tp}"))
    return cases


def _random_checkpoint(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in hf_shapes(cfg).items()}


def _reader(tensors: dict[str, torch.Tensor]):
    def read(name, dim, start, end):
        tensor = tensors[name]
        return tensor.clone() if dim is None else tensor.narrow(dim, start, end - start).clone()
    return read


def _megatron_full_shape(rule, cfg: ModelConfig, padded: int) -> tuple[int, ...]:
    """The TP=1 shape megatron gives the parameter of `rule` (checked against a real build below)."""
    H, D, F_ = cfg.hidden_size, cfg.head_size, cfg.intermediate_size
    if rule.split == "vocab":
        return (padded, H)
    if rule.split == "replicated":
        return (H,)
    if rule.split == "columns":
        return (H, cfg.num_heads * D if "linear_proj" in rule.megatron else F_)
    if rule.split == "gated":
        return (2 * F_, H)
    rows = (cfg.num_heads + 2 * cfg.kv_heads) * D
    return (rows,) if rule.megatron.endswith("bias") else (rows, H)


def _shard_shape(rule, full: tuple[int, ...], tp: int) -> tuple[int, ...]:
    """megatron's per-rank shape: output rows split for column-parallel layers, input columns for row-parallel."""
    if rule.split == "replicated":
        return full
    if rule.split == "columns":
        return (full[0], full[1] // tp)
    return (full[0] // tp, *full[1:])


@pytest.mark.parametrize("name,tp", _cases())
def test_shards_invert_exactly_and_have_megatron_shapes(name, tp):
    cfg = CONFIGS[name]
    original = _random_checkpoint(cfg)
    padded = pad_vocab_size(cfg.vocab_size, tp, 128)
    rebuilt: dict[str, torch.Tensor] = {}
    for rule in tensor_rules(cfg):
        shards = [shard_from_hf(rule, _reader(original), cfg, tp, r, padded) for r in range(tp)]
        expected = _shard_shape(rule, _megatron_full_shape(rule, cfg, padded), tp)
        for rank, shard in enumerate(shards):
            assert tuple(shard.shape) == expected, (rule.megatron, rank)
        pieces = hf_from_shards(rule, shards, cfg)
        assert set(pieces) == set(rule.hf)
        assert not set(pieces) & set(rebuilt), f"{rule.megatron} writes a tensor twice"
        rebuilt.update(pieces)
    assert set(rebuilt) == set(original)
    for key, tensor in original.items():
        assert torch.equal(rebuilt[key], tensor), key


@pytest.mark.parametrize("name,tp", _cases({k: CONFIGS[k] for k in ("gqa", "tied")}))
def test_padded_vocabulary_rows_are_zero(name, tp):
    cfg = CONFIGS[name]
    original = _random_checkpoint(cfg)
    padded = pad_vocab_size(cfg.vocab_size, tp, 128)
    for rule in (r for r in tensor_rules(cfg) if r.split == "vocab"):
        whole = torch.cat([shard_from_hf(rule, _reader(original), cfg, tp, r, padded) for r in range(tp)])
        assert whole.shape == (padded, cfg.hidden_size)
        assert torch.equal(whole[:cfg.vocab_size], original[rule.hf[0]])
        assert padded > cfg.vocab_size and not whole[cfg.vocab_size:].any()


def test_tied_has_no_output_layer_and_untied_has_lm_head():
    assert "lm_head.weight" not in hf_shapes(CONFIGS["tied"])
    assert not any(r.megatron == "output_layer.weight" for r in tensor_rules(CONFIGS["tied"]))
    untied = {r.megatron: r for r in tensor_rules(CONFIGS["gqa"])}
    assert untied["output_layer.weight"].hf == ("lm_head.weight",)


def _labelled(rows: int, width: int, offset: float) -> torch.Tensor:
    """Row i holds offset + i everywhere, so a slice says which rows it came from."""
    return (offset + torch.arange(rows, dtype=torch.float32))[:, None].expand(rows, width).clone()


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_shard_holds_its_q_heads_and_their_groups_kv(tp):
    """heads=8, kv=4, D=8: rank r holds q heads of groups r*4/tp.., each group as [q q k v]."""
    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=8,
                      num_kv_heads=4)
    D, H = 8, 64
    tensors = {"model.layers.0.self_attn.q_proj.weight": _labelled(8 * D, H, 0.0),
               "model.layers.0.self_attn.k_proj.weight": _labelled(4 * D, H, 1000.0),
               "model.layers.0.self_attn.v_proj.weight": _labelled(4 * D, H, 2000.0)}
    rule = next(r for r in tensor_rules(cfg) if r.split == "qkv")
    q, k, v = (tensors[n] for n in rule.hf)
    for rank in range(tp):
        shard = shard_from_hf(rule, _reader(tensors), cfg, tp, rank, 384)
        expected = []
        for group in range(rank * 4 // tp, (rank + 1) * 4 // tp):
            expected += [q[(2 * group) * D:(2 * group + 1) * D], q[(2 * group + 1) * D:(2 * group + 2) * D],
                         k[group * D:(group + 1) * D], v[group * D:(group + 1) * D]]
        assert torch.equal(shard, torch.cat(expected)), (tp, rank)
    # the q heads of rank r are exactly r*heads/tp .. (r+1)*heads/tp - 1
    if tp == 2:
        shard = shard_from_hf(rule, _reader(tensors), cfg, 2, 1, 384)
        q_rows = shard[:, 0][shard[:, 0] < 1000]
        assert torch.equal(q_rows, torch.arange(4 * D, 8 * D, dtype=torch.float32))
        assert torch.equal(shard[:, 0][(shard[:, 0] >= 1000) & (shard[:, 0] < 2000)] - 1000,
                           torch.arange(2 * D, 4 * D, dtype=torch.float32))


def test_qkv_shard_with_fewer_kv_heads_than_ranks_is_a_contiguous_slice_of_the_fused_matrix():
    """kv=1 < tp: megatron splits the fused [q0 q1 q2 q3 k v] rows evenly, all-gathers and re-slices."""
    cfg = CONFIGS["kv1"]
    original = _random_checkpoint(cfg)
    rule = next(r for r in tensor_rules(cfg) if r.split == "qkv")
    fused = torch.cat([original[rule.hf[0]], original[rule.hf[1]], original[rule.hf[2]]])  # one group: q.. k v
    for tp in (2, 4):
        rows = fused.shape[0] // tp
        for rank in range(tp):
            shard = shard_from_hf(rule, _reader(original), cfg, tp, rank, 384)
            assert torch.equal(shard, fused[rank * rows:(rank + 1) * rows]), (tp, rank)


def test_tensor_rules_follow_a_real_megatron_build(single_process_group):
    """Names, order and TP=1 shapes of the rules equal build_model's named_parameters, for two configs."""
    from pipeline.model import build_model

    ctx = ParallelContext.from_env()
    try:
        for name in ("qkv_bias", "tied", "kv1"):
            cfg = CONFIGS[name]
            model = build_model(cfg, ComputeConfig(), ctx)
            params = list(model.named_parameters())
            rules = tensor_rules(cfg)
            assert [n for n, _ in params] == [r.megatron for r in rules], name
            for rule, (_, param) in zip(rules, params):
                assert tuple(param.shape) == _megatron_full_shape(rule, cfg, model.padded_vocab), rule.megatron
            assert model.padded_vocab == 384
            assert not model.embedding.word_embeddings.weight[cfg.vocab_size:].any()
    finally:
        ctx.destroy()


@pytest.mark.parametrize("overrides,tp,device,needle", [
    (dict(num_heads=6, hidden_size=96), 4, "cuda", "num_heads=6"),
    (dict(num_heads=8, num_kv_heads=8, intermediate_size=130), 4, "cuda", "intermediate_size=130"),
    (dict(num_heads=12, num_kv_heads=6, hidden_size=96), 4, "cuda", "num_kv_heads=6"),
    (dict(num_kv_heads=1), 2, "cpu", "needs CUDA"),
    (dict(num_kv_heads=2), 4, "cpu", "num_kv_heads=2 < tp=4"),
])
def test_check_tp_names_the_setting(overrides, tp, device, needle):
    cfg = ModelConfig(**{**BASE, **overrides})
    with pytest.raises(ModelLayoutError, match="tensor-parallel") as err:
        check_tp(cfg, tp, device)
    assert needle in str(err.value)
    assert f"tp={tp}" in str(err.value)


def test_check_tp_accepts_valid_layouts():
    check_tp(CONFIGS["gqa"], 2, "cpu")
    check_tp(CONFIGS["kv1"], 4, "cuda")
    check_tp(CONFIGS["mha"], 4, "cpu")

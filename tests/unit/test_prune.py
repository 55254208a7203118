"""`distill prune` against transformers itself, on tiny random models and calibration shards made here.

An identity prune copies the teacher bit for bit (from a Hugging Face folder and from a TP-2 checkpoint);
a pruned model loads in transformers and our loader gives its logits; the layer-importance KL, the MLP
channel, head-group and hidden-channel scores equal a direct computation with transformers (layers deleted
from `model.model.layers`, forward hooks); the reported losses equal transformers' cross-entropy; the fixed
depth rule keeps layers 0, 2, …; heads go by whole GQA groups; bad targets exit 2 naming the flag.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.cli import main
from pipeline.prune.calibrate import calibration_samples
from pipeline.prune.run import prune
from pipeline.prune.targets import fixed_layers, parameter_count
from tests.modelmaker import VOCAB, hf_config, read_safetensors
from tests.shardmaker import make_token_shards

SAMPLES = 6


def make_teacher(kind: str, folder, layers: int = 2, seed: int = 0):
    """make_hf_model's random teacher (std 0.2, norms near 1) with `layers` layers, saved to `folder`."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(kind)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):  # qwen2 lists one attention type per layer
        config.layer_types = config.layer_types[:1] * layers
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1.0 + 0.1 * torch.randn_like(param)) if name.endswith("norm.weight") else param.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib")
    make_token_shards(folder, [4, 4], seq_len=16, vocab_size=VOCAB)
    return folder


def _hf_load(folder):
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _mean_ce(model, ids, mask) -> float:
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids[:, :-1]).logits.double(), -1)
    return float(-(logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask).sum() / mask.sum())


def test_calibration_reads_the_first_samples_in_manifest_order(shards):
    ids, mask = calibration_samples(str(shards), SAMPLES)
    assert [(int(a), int(b)) for a, b in ids[:, :2]] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert ids.shape == (SAMPLES, 17) and bool(mask.all())


def test_identity_prune_is_the_teacher_bit_for_bit(tmp_path, shards):
    make_teacher("llama_gqa", tmp_path / "t")
    report = prune(teacher=tmp_path / "t", tokens=shards, out=tmp_path / "s", samples=SAMPLES)
    teacher, student = read_safetensors(tmp_path / "t"), read_safetensors(tmp_path / "s")
    assert sorted(teacher) == sorted(student)
    for name, tensor in teacher.items():
        assert student[name].dtype == tensor.dtype and torch.equal(student[name], tensor), name
    assert report["student_loss"] == pytest.approx(report["teacher_loss"], rel=1e-6)
    assert json.loads((tmp_path / "s" / "prune_report.json").read_text())["kept_layers"] == [0, 1]


def test_identity_prune_of_a_tp2_checkpoint(tmp_path, shards):
    from pipeline.model.tp_checkpoint import hf_to_tp_checkpoint

    make_teacher("qwen2", tmp_path / "t")
    hf_to_tp_checkpoint(tmp_path / "t", tmp_path / "tp", 2)
    prune(teacher=tmp_path / "tp", tokens=shards, out=tmp_path / "s", samples=2)
    teacher, student = read_safetensors(tmp_path / "t"), read_safetensors(tmp_path / "s")
    assert sorted(teacher) == sorted(student)
    assert all(torch.equal(student[name], tensor) for name, tensor in teacher.items())


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen2", "llama_tied"])
def test_pruned_model_loads_in_transformers_and_our_logits_match(kind, tmp_path, shards):
    from pipeline.model import load_hf
    from pipeline.parallel import ParallelContext

    teacher = make_teacher(kind, tmp_path / "t", layers=3)
    report = prune(teacher=tmp_path / "t", tokens=shards, out=tmp_path / "s", samples=SAMPLES, num_layers=2,
                   hidden_size=40, intermediate_size=72, num_heads=2, depth="importance")
    student = _hf_load(tmp_path / "s")
    assert (student.config.num_hidden_layers, student.config.hidden_size, student.config.intermediate_size,
            student.config.num_attention_heads, student.config.head_dim) == (2, 40, 72, 2, 16)
    ids, mask = calibration_samples(str(shards), SAMPLES)
    assert report["student_loss"] == pytest.approx(_mean_ce(student, ids, mask), rel=1e-4)
    assert report["teacher_loss"] == pytest.approx(_mean_ce(teacher, ids, mask), rel=1e-4)
    assert report["student"]["parameters"] == sum(p.numel() for p in student.parameters())
    ctx = ParallelContext.from_env()
    try:
        ours = load_hf(tmp_path / "s", ctx).eval()
        with torch.no_grad():
            mine = ours(ids[:, :-1])[..., :VOCAB]
            theirs = student(input_ids=ids[:, :-1]).logits
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    finally:
        ctx.destroy()


def _direct_scores(model, ids, mask):
    """Mean |down_proj input| per channel, mean ‖o_proj input head‖ per head, mean |residual| per channel."""
    cfg, where = model.config, mask.double()[..., None]
    count = mask.sum()
    mlp, heads, hidden = {}, {}, []
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: mlp.__setitem__(i, (a[0].abs().double() * where).sum((0, 1)) / count)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: heads.__setitem__(i, (a[0].unflatten(-1, (cfg.num_attention_heads, -1)).norm(dim=-1)
                                                    .double() * where).sum((0, 1)) / count)))
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, k: hidden.append((k.get("hidden_states", a[0] if a else None).abs().double() * where)
                                          .sum((0, 1)) / count), with_kwargs=True))
    hooks.append(model.model.norm.register_forward_pre_hook(
        lambda m, a: hidden.append((a[0].abs().double() * where).sum((0, 1)) / count)))
    with torch.no_grad():
        model(input_ids=ids[:, :-1])
    for hook in hooks:
        hook.remove()
    return mlp, heads, torch.stack(hidden).mean(0)


def _direct_layer_kl(model, ids, mask) -> list[float]:
    with torch.no_grad():
        full = F.log_softmax(model(input_ids=ids[:, :-1]).logits.double(), -1)
        out = []
        for i in range(len(model.model.layers)):
            skipped = copy.deepcopy(model)
            skipped.model.layers = torch.nn.ModuleList(l for j, l in enumerate(skipped.model.layers) if j != i)
            logp = F.log_softmax(skipped(input_ids=ids[:, :-1]).logits.double(), -1)
            out.append(float(((full.exp() * (full - logp)).sum(-1) * mask).sum() / mask.sum()))
    return out


def test_scores_equal_a_direct_computation_in_transformers(tmp_path, shards):
    teacher = make_teacher("llama_kv4", tmp_path / "t", layers=3)
    report = prune(teacher=tmp_path / "t", tokens=shards, out=tmp_path / "s", samples=SAMPLES, num_layers=2,
                   depth="importance", intermediate_size=100, num_heads=4, hidden_size=48)
    ids, mask = calibration_samples(str(shards), SAMPLES)
    kl = _direct_layer_kl(teacher, ids, mask)
    assert report["layer_importance_kl"] == pytest.approx(kl, rel=1e-4, abs=2e-6)
    assert report["kept_layers"] == sorted(sorted(range(3), key=lambda i: -kl[i])[:2])
    mlp, heads, hidden = _direct_scores(teacher, ids, mask)
    for j, i in enumerate(report["kept_layers"]):
        assert report["mlp_channel_scores"][j] == pytest.approx(mlp[i].tolist(), rel=1e-4, abs=2e-6)
        assert report["kept_mlp_channels"][j] == sorted(torch.argsort(-mlp[i])[:100].tolist())
        groups = heads[i].reshape(4, 2).mean(1)
        assert report["kv_group_scores"][j] == pytest.approx(groups.tolist(), rel=1e-4, abs=2e-6)
        assert report["kept_kv_heads"][j] == sorted(torch.argsort(-groups)[:2].tolist())
    assert report["hidden_channel_scores"] == pytest.approx(hidden.tolist(), rel=1e-4, abs=2e-6)
    assert report["kept_hidden_channels"] == sorted(torch.argsort(-hidden)[:48].tolist())


def test_fixed_depth_keeps_every_other_layer(tmp_path, shards):
    assert fixed_layers(12, 6) == [0, 2, 4, 6, 8, 10] and fixed_layers(5, 5) == [0, 1, 2, 3, 4]
    make_teacher("llama_gqa", tmp_path / "t", layers=4)
    report = prune(teacher=tmp_path / "t", tokens=shards, out=tmp_path / "s", samples=2, num_layers=2)
    assert report["kept_layers"] == [0, 2] and report["layer_importance_kl"] is None
    teacher, student = read_safetensors(tmp_path / "t"), read_safetensors(tmp_path / "s")
    for name, tensor in student.items():
        source = name.replace("layers.1.", "layers.2.")
        assert torch.equal(tensor, teacher[source]), name
    assert _hf_load(tmp_path / "s").config.num_hidden_layers == 2


def test_gqa_heads_go_by_whole_groups(tmp_path, shards):
    make_teacher("llama_kv4", tmp_path / "t")  # 8 query heads, 4 kv heads, head_dim 8
    report = prune(teacher=tmp_path / "t", tokens=shards, out=tmp_path / "s", samples=SAMPLES, num_heads=4)
    config = _hf_load(tmp_path / "s").config
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    teacher, student = read_safetensors(tmp_path / "t"), read_safetensors(tmp_path / "s")
    for j in range(2):
        groups = report["kept_kv_heads"][j]
        scores = report["kv_group_scores"][j]
        assert groups == sorted(sorted(range(4), key=lambda g: -scores[g])[:2])
        assert report["kept_query_heads"][j] == [2 * g + h for g in groups for h in range(2)]
        attn = f"model.layers.{j}.self_attn."
        q_rows = torch.cat([teacher[attn + "q_proj.weight"][8 * q:8 * q + 8] for g in groups for q in (2 * g, 2 * g + 1)])
        k_rows = torch.cat([teacher[attn + "k_proj.weight"][8 * g:8 * g + 8] for g in groups])
        assert torch.equal(student[attn + "q_proj.weight"], q_rows)
        assert torch.equal(student[attn + "k_proj.weight"], k_rows)
        o_cols = torch.cat([teacher[attn + "o_proj.weight"][:, 8 * q:8 * q + 8] for g in groups
                            for q in (2 * g, 2 * g + 1)], dim=1)
        assert torch.equal(student[attn + "o_proj.weight"], o_cols)


def test_params_target_shrinks_depth_then_mlp(tmp_path, shards):
    from pipeline.prune.run import teacher_config

    make_teacher("llama_gqa", tmp_path / "t", layers=4)
    cfg = teacher_config(tmp_path / "t")
    per_layer = parameter_count(cfg) - parameter_count(dataclasses.replace(cfg, num_layers=3))
    goal = parameter_count(cfg) - 2 * per_layer - 1000  # two layers are not enough: the MLP must narrow
    report = prune(teacher=tmp_path / "t", tokens=shards, out=tmp_path / "s", samples=2, params=goal)
    assert report["student"]["num_layers"] == 2 and report["student"]["intermediate_size"] < 128
    assert report["student"]["parameters"] <= goal
    wider = dataclasses.replace(cfg, num_layers=2, intermediate_size=report["student"]["intermediate_size"] + 1)
    assert parameter_count(wider) > goal  # the widest MLP that fits
    assert sum(p.numel() for p in _hf_load(tmp_path / "s").parameters()) == report["student"]["parameters"]


@pytest.mark.parametrize("flags, named", [
    (["--num-heads", "8"], "--num-heads 8"),
    (["--num-heads", "3"], "would split a grouped-query group"),
    (["--num-layers", "3"], "--num-layers 3"),
    (["--hidden-size", "65"], "--hidden-size 65"),
    (["--hidden-size", "50"], "not a multiple of the 4 query heads"),
    (["--intermediate-size", "0"], "--intermediate-size 0"),
    (["--params", "10", "--num-layers", "1"], "--params"),
    (["--params", "10"], "--params 10"),
    (["--samples", "9"], "--samples 9"),
])
def test_bad_targets_are_clear_errors(flags, named, tmp_path, shards, capsys):
    make_teacher("llama_gqa", tmp_path / "t")
    code = main(["prune", "--teacher", str(tmp_path / "t"), "--tokens", str(shards), "--out", str(tmp_path / "s"),
                 "--samples", "2", *flags])
    assert code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "s").exists()

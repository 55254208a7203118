"""The intermediate-state loss (pipeline/online/hidden.py) against transformers' own hidden states, in one process.

A 3-layer student of width 32 and a 2-layer teacher of width 64 (random Hugging Face models loaded with
`load_hf`) run their forwards inside `HiddenLoss.recording()`; the loss must equal the same distance computed
from transformers' forward of the same weights (`output_hidden_states`, and a hook for the last layer's output
before the final norm, which `output_hidden_states` replaces by the normed state), through the same map, over
the same masked positions. Its gradient must equal the reference's at the map and at a student weight. The
hooks must record nothing outside `recording()`, and the map attached by `attach_map` must be a pure function
of the seed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import load_hf
from pipeline.online.hidden import MAP_NAME, HiddenLoss, HiddenMap, attach_map, initial_map, map_shape
from pipeline.train.errors import TrainError
from tests.modelmaker import BASE, make_hf_model, random_tokens
from tests.trainkit import train_config

STUDENT_HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_key_value_heads=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("hidden")
    teacher = make_hf_model("llama_gqa", root / "teacher", seed=3)
    torch.manual_seed(4)
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **STUDENT_HF})).float()
    with torch.no_grad():
        for param in student.parameters():
            param.normal_(0.0, 0.2)
    student.save_pretrained(root / "student")
    return root, teacher.eval(), student.eval()


def _cfg(root, **teacher):
    settings = {"teacher.online": root / "teacher", "teacher.hidden_weight": 0.5, **teacher}
    return train_config([f"run_dir={root / 'run'}", f"data.tokens={root}", "model.hidden_size=32",
                         "model.vocab_size=300"] + [f"{k}={v}" for k, v in settings.items()])


def _hf_states(model, tokens, layers):
    """{layer: [B, S, H]} from transformers: hidden_states[l] for l < L, the last layer's own output for L."""
    kept = {}
    handle = model.model.layers[-1].register_forward_hook(
        lambda module, args, out: kept.setdefault("last", out[0] if isinstance(out, tuple) else out))
    out = model.model(input_ids=tokens, output_hidden_states=True)
    handle.remove()
    count = len(model.model.layers)
    return {layer: kept["last"] if layer == count else out.hidden_states[layer] for layer in layers}


def _reference(student_hf, teacher_hf, tokens, mask, pairs, weight, kind):
    with torch.no_grad():
        teacher = _hf_states(teacher_hf, tokens, [t for _, t in pairs])
    student = _hf_states(student_hf, tokens, [s for s, _ in pairs])
    total = 0.0
    for s, t in pairs:
        mapped = student[s] @ weight.T
        if kind == "mse":
            per = ((mapped - teacher[t]) ** 2).mean(-1)
        else:
            per = 1 - F.cosine_similarity(mapped, teacher[t], dim=-1)
        total = total + (per * mask).sum() / mask.sum()
    return total / len(pairs)


def _ours(ctx, root, cfg):
    teacher = load_hf(root / "teacher", ctx).eval().requires_grad_(False)
    student = load_hf(root / "student", ctx)
    attach_map(student, cfg)
    return student, teacher, HiddenLoss(cfg, student, teacher)


@pytest.mark.parametrize("kind,student_layers,teacher_layers", [
    ("mse", [], []), ("cosine", [0, 1, 3], [0, 1, 2]), ("mse", [2, 3], [1, 2])])
def test_loss_and_gradients_match_transformers(ctx, models, kind, student_layers, teacher_layers):
    root, teacher_hf, student_hf = models
    cfg = _cfg(root, **{"teacher.hidden_loss": kind, "teacher.student_layers": student_layers,
                        "teacher.teacher_layers": teacher_layers})
    student, teacher, hidden = _ours(ctx, root, cfg)
    tokens = random_tokens(batch=2, seq=12, seed=7)
    mask = torch.ones(2, 12)
    mask[0, :5] = 0  # a prompt that does not count
    mask[1, 9:] = 0  # padding
    with hidden.recording():
        with torch.no_grad():
            teacher(tokens)
        student(tokens)
    loss = hidden.loss(mask.bool())
    loss.backward()

    pairs = list(zip(student_layers or [3], teacher_layers or [2]))
    weight = getattr(student, MAP_NAME).weight.detach().clone().requires_grad_(True)
    student_hf.zero_grad()
    expected = _reference(student_hf, teacher_hf, tokens, mask, pairs, weight, kind)
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(loss.detach()) > 1e-3
    grad = getattr(student, MAP_NAME).weight.grad
    assert grad is not None and grad.abs().max() > 0
    torch.testing.assert_close(grad, weight.grad, rtol=1e-4, atol=1e-7)
    down = dict(student.named_parameters())["decoder.layers.0.mlp.linear_fc2.weight"].grad
    reference_down = student_hf.model.layers[0].mlp.down_proj.weight.grad
    assert down is not None and down.abs().max() > 0, "the loss must reach the student's layers"
    torch.testing.assert_close(down, reference_down, rtol=1e-4, atol=1e-7)
    student_hf.zero_grad()
    assert all(p.grad is None for p in teacher.parameters())


def test_masked_positions_do_not_count(ctx, models):
    root, _, _ = models
    student, teacher, hidden = _ours(ctx, root, _cfg(root))
    tokens = random_tokens(batch=1, seq=10, seed=2)
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 300  # later tokens change only the states at positions ≥ 8 (causal)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 8:] = False
    values = []
    for inputs in (tokens, changed):
        with hidden.recording(), torch.no_grad():
            teacher(inputs)
            student(inputs)
        values.append(float(hidden.loss(mask)))
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    with hidden.recording(), torch.no_grad():
        teacher(changed)
        student(changed)
    assert float(hidden.loss(torch.ones(1, 10, dtype=torch.bool))) != pytest.approx(values[0], rel=1e-4)


def test_hooks_record_only_inside_recording(ctx, models):
    root, _, _ = models
    student, teacher, hidden = _ours(ctx, root, _cfg(root))
    with torch.no_grad():
        teacher(random_tokens(batch=1, seq=6))
        student(random_tokens(batch=1, seq=6))
    assert hidden.student.states == {} and hidden.teacher.states == {}
    with pytest.raises(RuntimeError, match="no recorded states"):
        hidden.loss(torch.ones(1, 6, dtype=torch.bool))
    hidden.remove()
    with hidden.recording(), torch.no_grad():
        student(random_tokens(batch=1, seq=6))
    assert hidden.student.states == {}


def test_map_is_seeded_and_only_when_widths_differ(ctx, models):
    root, _, _ = models
    cfg = _cfg(root)
    assert map_shape(cfg) == [64, 32]
    student = load_hf(root / "student", ctx)
    attach_map(student, cfg)
    weight = getattr(student, MAP_NAME).weight
    torch.testing.assert_close(weight, initial_map([64, 32], cfg.seed), rtol=0, atol=0)
    assert not torch.equal(initial_map([64, 32], cfg.seed), initial_map([64, 32], cfg.seed + 1))
    assert 0.8 < float(weight.std() * 32 ** 0.5) < 1.2  # std 1/√H_s: a state keeps its norm on average
    assert map_shape(_cfg(root, **{"teacher.hidden_weight": 0.0})) is None
    same_width = train_config([f"run_dir={root / 'run'}", f"data.tokens={root}", "model.vocab_size=300",
                               "model.hidden_size=64",
                               f"teacher.online={root / 'teacher'}", "teacher.hidden_weight=1"])
    assert map_shape(same_width) is None


def test_layers_beyond_the_model_are_refused(ctx, models):
    root, _, _ = models
    cfg = _cfg(root, **{"teacher.student_layers": [1], "teacher.teacher_layers": [3]})
    with pytest.raises(TrainError, match=r"teacher\.teacher_layers: layer 3 of a 2-layer teacher"):
        _ours(ctx, root, cfg)
    student = load_hf(root / "student", ctx)
    teacher = load_hf(root / "teacher", ctx)
    with pytest.raises(TrainError, match="no hidden_map"):
        HiddenLoss(_cfg(root), student, teacher)


def test_hidden_map_is_a_plain_linear_map():
    module = HiddenMap(3, 5, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        module.weight.copy_(torch.arange(15.0).reshape(5, 3))
    torch.testing.assert_close(module(torch.tensor([[1.0, 0.0, 2.0]])), torch.tensor([[4.0, 13.0, 22.0, 31.0, 40.0]]))

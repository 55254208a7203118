"""`model.init`: a student that starts from a Hugging Face folder or a TP checkpoint, at any DP and TP.

The checkpoint A is a random llama_gqa model (tests/modelmaker.py) and the runs name nothing of the model
but `model.init` (its architecture is taken from it). Two spawns, one of world 1 and one of world 2:
- DP 1 TP 1, DP 2 TP 1 and DP 1 TP 2 run one step at lr 1e-30 on plain CE: the first train/loss equals
  transformers' own mean CE of A on that step's four samples (read here with the trainer's dataset
  class), and the exported run gives back A's tensors to the bit;
- a run initialised from a TP checkpoint of A split for tp 2, trained at tp 1, exports A's tensors too;
- resume ignores init: 2 steps from A, then the same run_dir with init B (another model) and steps 4
  logs steps 3 and 4 equal to an uninterrupted 4-step run from A;
- an architecture field that differs from the checkpoint's is refused by name before anything is built.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from tests.harness import run_distributed
from tests.modelmaker import make_hf_model, read_safetensors
from tests.shardmaker import make_token_shards
from tests.trainkit import final_weights, losses, train_config

SEQ = 16
FLAT = dict(micro_batch=2, optim__lr=1e-30, optim__min_lr=0.0, optim__warmup_steps=0, data__shuffle="false")


def _overrides(run_dir, tokens, init, *, steps=1, micro_batch=2, grad_accumulation=1, tp=1, **extra) -> list[str]:
    out = [f"run_dir={run_dir}", f"data.tokens={tokens}", f"model.init={init}", "compute.vocab_multiple=64",
           f"schedule.steps={steps}", f"schedule.micro_batch={micro_batch}",
           f"schedule.grad_accumulation={grad_accumulation}", f"parallel.tp={tp}", "data.num_workers=0",
           "loss.divergence=ce", "log.progress=false", "log.tensorboard=false", "checkpoint.every=0", "eval.every=0"]
    return out + [f"{key.replace('__', '.')}={value}" for key, value in extra.items()]


def _train(rank: int, world: int, runs: list) -> list:
    from pipeline.train.run import run_training

    return [run_training(train_config(overrides)) for overrides in runs]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipeline.model.tp_checkpoint import hf_to_tp_checkpoint

    folder = tmp_path_factory.mktemp("train_init")
    make_token_shards(folder / "tokens", [10, 10], seq_len=SEQ, vocab_size=300, seed=0)
    make_hf_model("llama_gqa", folder / "A", seed=5)
    make_hf_model("llama_gqa", folder / "B", seed=6)
    hf_to_tp_checkpoint(folder / "A", folder / "A_tp2", 2, vocab_multiple=64)
    tokens, a = folder / "tokens", folder / "A"
    flat_lr = dict(optim__lr=0.01, optim__min_lr=0.01, optim__warmup_steps=0)  # the same lr at any schedule.steps
    runs = {"dp1": _overrides(folder / "dp1", tokens, a, grad_accumulation=2, **FLAT),
            "tpck": _overrides(folder / "tpck", tokens, folder / "A_tp2", **FLAT),
            "full": _overrides(folder / "full", tokens, a, steps=4, **flat_lr),
            "cut": _overrides(folder / "resumed", tokens, a, steps=2, **flat_lr),
            "resumed": _overrides(folder / "resumed", tokens, folder / "B", steps=4, **flat_lr)}
    assert run_distributed(_train, 1, [runs[n] for n in ("dp1", "tpck", "full", "cut", "resumed")]) == [[0] * 5]
    wide = {"dp2": _overrides(folder / "dp2", tokens, a, **FLAT),
            "tp2": _overrides(folder / "tp2", tokens, a, grad_accumulation=2, tp=2, **FLAT)}
    assert run_distributed(_train, 2, [wide["dp2"], wide["tp2"]]) == [[0, 0], [0, 0]]
    return folder


def _reference_loss(folder) -> float:
    """transformers' mean CE of A over the trainer's first step: reader slots 0 and 1 of 2, batch 0 each."""
    import transformers

    from pipeline.data.dataset import Source, TokenShardDataset

    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "A", dtype=torch.float32).eval()
    total, count = 0.0, 0
    for slot in range(2):
        batch = TokenShardDataset(Source(str(folder / "tokens")), micro_batch=2, dp_rank=slot, dp_size=2, seed=1234,
                                  shuffle=False).batch(0)
        tokens = batch["tokens"].long()
        with torch.no_grad():
            log_q = model(input_ids=tokens[:, :-1]).logits.double().log_softmax(-1)
        ce = -log_q.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        total, count = total + float(ce.sum()), count + ce.numel()
    return total / count


@pytest.mark.dist
@pytest.mark.parametrize("name", ["dp1", "dp2", "tp2"])
def test_first_loss_is_the_checkpoints_own(world, name):
    want = _reference_loss(world)
    got = losses(world / name)[1]
    assert got == pytest.approx(want, rel=1e-5), f"{name}: first train/loss {got}, transformers on A {want}"
    resolved = yaml.safe_load((world / name / "config.yaml").read_text())["model"]
    assert (resolved["init"], resolved["hidden_size"], resolved["num_kv_heads"], resolved["norm_eps"]) == \
        (str(world / "A"), 64, 2, 1e-6), "config.yaml holds the checkpoint's architecture"


@pytest.mark.dist
@pytest.mark.parametrize("name", ["dp1", "tp2", "tpck"])
def test_export_right_after_init_gives_back_the_tensors(world, name):
    original = read_safetensors(world / "A")
    exported = final_weights(world / name, world / f"{name}_hf")
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), f"{name}: {key} differs from A's"


@pytest.mark.dist
def test_resume_ignores_init(world):
    full, resumed = losses(world / "full"), losses(world / "resumed")
    assert sorted(full) == [1, 2, 3, 4] and sorted(resumed) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), f"step {step}"
    assert full[4] < full[1] - 1e-3, "training moved"
    assert yaml.safe_load((world / "resumed" / "config.yaml").read_text())["model"]["init"] == str(world / "B")


def test_architecture_mismatch_names_the_field(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.train.errors import TrainError
    from pipeline.train.init_from import resolve_init

    make_token_shards(tmp_path / "tokens", [4], seq_len=SEQ, vocab_size=300)
    make_hf_model("llama_gqa", tmp_path / "A")
    overrides = _overrides(tmp_path / "run", tmp_path / "tokens", tmp_path / "A", model__hidden_size=128)
    with pytest.raises(TrainError, match=r"model\.hidden_size=128 .*hidden_size=64"):
        resolve_init(train_config(overrides))
    assert main(["train", *overrides]) == 2
    assert "model.hidden_size=128" in capsys.readouterr().err
    assert not (tmp_path / "run").exists(), "refused before the run folder was made"
    # fields equal to the checkpoint's may be given; defaults are filled from it
    same = resolve_init(train_config(_overrides(tmp_path / "run", tmp_path / "tokens", tmp_path / "A",
                                                model__num_heads=4))).model
    assert (same.num_heads, same.num_layers, same.vocab_size, same.rope_scaling) == (4, 2, 300, "llama3")

"""A DeepSpeed ZeRO-3 trainer checkpoint exported offline loads in transformers with the trained logits.

Two gloo processes train the tiny student for two steps in each layout (tp=1 dp=2, tp=2 dp=1, and
tp=2 with tied embeddings), save a checkpoint as the trainer does (engine.save_checkpoint plus
run.json) and return the engine's full-vocabulary logits on a fixed input, before and after training.
The test process then exports each checkpoint (one process, no torch.distributed) and checks that
`AutoModelForCausalLM` gives the trained logits, and that they are not the untrained ones.
The error tests need no processes: they use the folders of the same spawn, damaged in copies.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.model.errors import CheckpointError
from pipeline.train.export import export_checkpoint
from tests.harness import run_distributed
from tests.modelmaker import random_tokens

WORLD = 2
TAG = "step_00000002"
MODEL = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
         "num_kv_heads": 2}
CASES = {"tp1": (1, False), "tp2": (2, False), "tp2_tied": (2, True)}  # name -> (tp, tie_embeddings)
DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3},
             "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 10**9}


def _full_logits(engine, tokens: torch.Tensor, ctx, vocab: int) -> torch.Tensor:
    import torch.distributed as dist

    with torch.no_grad():
        local = engine(tokens).float().contiguous()
    pieces = [torch.empty_like(local) for _ in range(ctx.tp_size)]
    dist.all_gather(pieces, local, group=ctx.tp_group)
    return torch.cat(pieces, dim=-1)[..., :vocab]


def _train_case(root: Path, tp: int, tied: bool) -> dict:
    import torch.distributed as dist

    from pipeline.config import ComputeConfig, ModelConfig, TrainConfig, config_to_dict, from_dict
    from pipeline.losses import distill_loss
    from pipeline.model.builder import LlamaGPT
    from pipeline.parallel import ParallelContext
    from pipeline.train.engine import import_deepspeed

    model_cfg = ModelConfig(**MODEL, tie_embeddings=tied)
    probe = random_tokens(2, 16, seed=7)
    with ParallelContext.from_env(tp=tp) as ctx:
        deepspeed = import_deepspeed(ctx)
        # data_parallel_group is required: zero.Init ignores mpu's and partitions over the world, which
        # for tp > 1 mixes the TP ranks' shards into one tensor
        with deepspeed.zero.Init(config_dict_or_path=DS_CONFIG, mpu=ctx, data_parallel_group=ctx.dp_group):
            model = LlamaGPT(model_cfg, ComputeConfig(), ctx, seed=0)
        engine, *_ = deepspeed.initialize(model=model, config=DS_CONFIG, mpu=ctx, dist_init_required=False)
        before = _full_logits(engine, probe, ctx, model_cfg.vocab_size)
        for step in range(2):
            tokens = random_tokens(2, 16, seed=100 + 10 * step + ctx.dp_rank)
            logits = engine(tokens)
            loss = distill_loss(logits, None, divergence="ce", labels=tokens.roll(-1, dims=1),
                                vocab_size=model_cfg.vocab_size, tp_group=ctx.tp_group).loss
            engine.backward(loss)
            engine.step()
        checkpoints = root / "checkpoints"
        engine.save_checkpoint(str(checkpoints), tag=TAG)
        if ctx.rank == 0:
            cfg = from_dict(TrainConfig, {"model": config_to_dict(model_cfg), "run_dir": str(root),
                                          "parallel": {"tp": tp}})
            run = {"config": config_to_dict(cfg), "layout": {"world": WORLD, "tp": tp, "dp": WORLD // tp}, "step": 2}
            (checkpoints / TAG / "run.json").write_text(json.dumps(run))
        after = _full_logits(engine, probe, ctx, model_cfg.vocab_size)
        dist.barrier()
        engine.destroy()
    return {"before": before, "after": after, "probe": probe}


def _train_and_save(rank: int, world: int, root: str) -> dict:
    os.environ["DS_ACCELERATOR"] = "cpu"
    return {name: _train_case(Path(root) / name, tp, tied) for name, (tp, tied) in CASES.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("runs")
    return root, run_distributed(_train_and_save, WORLD, str(root))[0]


def _hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


@pytest.mark.dist
@pytest.mark.parametrize("case", list(CASES))
def test_exported_checkpoint_gives_the_trained_logits(trained, case, tmp_path):
    root, results = trained
    source = {"tp1": root / "tp1", "tp2": root / "tp2" / "checkpoints",
              "tp2_tied": root / "tp2_tied" / "checkpoints" / TAG}[case]  # every accepted form of the path
    out = export_checkpoint(source, tmp_path / "hf", progress=False)
    got = _hf_logits(out, results[case]["probe"])
    torch.testing.assert_close(got, results[case]["after"], rtol=0, atol=1e-4)
    assert (got - results[case]["before"]).abs().max() > 1e-2, "training did not change the logits"
    tied = json.loads((out / "config.json").read_text())["tie_word_embeddings"]
    assert tied == CASES[case][1]


@pytest.mark.dist
def test_errors_name_the_path_and_what_was_expected(trained, tmp_path):
    root, _ = trained
    with pytest.raises(CheckpointError, match="expected a run folder"):
        export_checkpoint(tmp_path, tmp_path / "hf", progress=False)

    broken = tmp_path / "broken"
    shutil.copytree(root / "tp2" / "checkpoints" / TAG, broken)
    (broken / "zero_pp_rank_0_mp_rank_01_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_01_optim_states.pt: missing"):
        export_checkpoint(broken, tmp_path / "hf", progress=False)
    (broken / "zero_pp_rank_0_mp_rank_01_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="zero_pp_rank_0_mp_rank_01_model_states.pt: missing"):
        export_checkpoint(broken, tmp_path / "hf", progress=False)

    (root / "tp1" / "checkpoints" / "latest").write_text("step_00000099")
    try:
        with pytest.raises(CheckpointError, match="names checkpoint 'step_00000099'"):
            export_checkpoint(root / "tp1", tmp_path / "hf", progress=False)
    finally:
        (root / "tp1" / "checkpoints" / "latest").write_text(TAG)

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_checkpoint(root / "tp1", taken, progress=False)
    assert export_checkpoint(root / "tp1", taken, overwrite=True, progress=False) == taken
    assert not (taken / "keep.txt").exists() and (taken / "config.json").is_file()


@pytest.mark.dist
def test_the_runs_tokenizer_travels_with_the_export_or_is_warned_about(trained, tmp_path):
    import transformers

    from tokenization.tokenizer import train_tokenizer

    root, _ = trained
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"] * 20))
    tok_file = tmp_path / "tok" / "tokenizer.json"
    tok = train_tokenizer([corpus], 280, out_path=tok_file)
    tag = tmp_path / TAG
    shutil.copytree(root / "tp1" / "checkpoints" / TAG, tag)
    run = json.loads((tag / "run.json").read_text())
    run["config"]["data"]["tokenizer"] = str(tok_file)
    (tag / "run.json").write_text(json.dumps(run))

    out = export_checkpoint(tag, tmp_path / "with", progress=False)
    assert transformers.AutoTokenizer.from_pretrained(out).encode("the lazy fox", add_special_tokens=False) == \
        tok.encode("the lazy fox").ids

    tok_file.unlink()
    with pytest.warns(UserWarning, match="tokenizer .* no longer exists"):
        out = export_checkpoint(tag, tmp_path / "without", progress=False)
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").exists()


@pytest.mark.dist
def test_bf16_runs_optimizer_file_names_are_accepted(trained, tmp_path):
    """DeepSpeed names a bf16 run's optimizer files bf16_zero_pp_rank_*; the export must find them."""
    root, results = trained
    tag = tmp_path / TAG
    shutil.copytree(root / "tp2" / "checkpoints" / TAG, tag)
    for file in tag.glob("zero_pp_rank_*_optim_states.pt"):
        file.rename(file.with_name("bf16_" + file.name))
    out = export_checkpoint(tag, tmp_path / "hf", progress=False)
    torch.testing.assert_close(_hf_logits(out, results["tp2"]["probe"]), results["tp2"]["after"], rtol=0, atol=1e-4)

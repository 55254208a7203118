"""Generation at TP 2 and 4, and on a ZeRO-3-partitioned model, against one process in the parent.

One spawn of four gloo processes runs three layouts in turn: tp=1 with the model wrapped by a DeepSpeed
ZeRO-3 engine over dp=4 (each DP rank decodes its own prompts; nothing persists unpartitioned, so a
decode that let ZeRO's hooks run would gather and release every layer at every step, which the test
counts), tp=2 and tp=4. Every rank returns its tokens; the parent
decodes the same prompts with one process and, for greedy decoding, with `transformers`.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.config import SamplingConfig
from tests.harness import run_distributed
from tests.modelmaker import VOCAB, make_hf_model

SETTINGS = {"greedy": SamplingConfig(mode="greedy", max_new_tokens=8),
            "sample": SamplingConfig(max_new_tokens=8),
            "top_k": SamplingConfig(top_k=30, temperature=0.8, max_new_tokens=8),
            "top_p": SamplingConfig(top_p=0.9, max_new_tokens=8),
            "both": SamplingConfig(top_k=50, top_p=0.7, temperature=1.3, max_new_tokens=8)}
KINDS = {2: ("llama_kv4", "qwen2", "mistral"), 4: ("llama_kv4",)}
SEED = 21


def _prompts(rank: int = 0) -> tuple[list[torch.Tensor], list[str]]:
    generator = torch.Generator().manual_seed(100 + rank)
    lengths = (5, 11, 3)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in lengths], \
        [f"r{rank}-{i}" for i in range(len(lengths))]


def _all(model, group, eos_id, prompts, keys) -> dict:
    from pipeline.generate import generate

    return {name: [t.tolist() for t in generate(model, prompts, keys, sampling, vocab_size=VOCAB, eos_id=eos_id,
                                                 seed=SEED, group=group).tokens]
            for name, sampling in SETTINGS.items()}


def _zero3(ctx, folder: str, eos_id: int) -> dict:
    """tp=1, dp=4: generate through a ZeRO-3 engine; count how often parameters are partitioned again
    (once per gather) in a 2-step and an 8-step call. Each DP rank decodes its own prompts."""
    from pipeline.generate import generate
    from pipeline.model import load_hf
    from pipeline.train.engine import import_deepspeed

    deepspeed = import_deepspeed(ctx)
    config = {"train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # tiny params persist otherwise
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=load_hf(folder, ctx), config=config, mpu=ctx, dist_init_required=False)
    assert any(p.numel() == 0 for p in engine.module.parameters()), "ZeRO-3 did not partition the model"
    prompts, keys = _prompts(ctx.dp_rank)
    tokens = _all(engine, ctx.tp_group, eos_id, prompts, keys)
    counted = {"partitions": 0}

    def counting(method):
        def call(*args, **kwargs):
            counted["partitions"] += 1
            return method(*args, **kwargs)
        return call

    params = list(engine.module.parameters())
    for param in params:  # a parameter is partitioned again after every use that gathered it
        param.partition = counting(param.partition)
    gathers = []
    for steps in (2, 8):
        counted["partitions"] = 0
        generate(engine, prompts, keys, SamplingConfig(mode="greedy", max_new_tokens=steps),
                 vocab_size=VOCAB, eos_id=None, group=ctx.tp_group)
        gathers.append(counted["partitions"])
    return {"tokens": tokens, "gathers": gathers, "dp_rank": ctx.dp_rank}


def _worker(rank: int, world_size: int, root: str, eos_id: int) -> dict:
    from pipeline.model import load_hf
    from pipeline.parallel import ParallelContext

    out = {}
    with ParallelContext.from_env(tp=1) as ctx:
        out["zero3"] = _zero3(ctx, f"{root}/llama_kv4", eos_id)
    for tp, kinds in KINDS.items():
        with ParallelContext.from_env(tp=tp) as ctx:
            prompts, keys = _prompts()
            out[tp] = {kind: _all(load_hf(f"{root}/{kind}", ctx), ctx.tp_group, eos_id, prompts, keys)
                       for kind in kinds}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    hf = {kind: make_hf_model(kind, root / kind) for kind in ("llama_kv4", "qwen2", "mistral")}
    eos_id = 17
    return root, hf, eos_id, run_distributed(_worker, 4, str(root), eos_id)


@pytest.fixture(scope="module")
def single(results):
    """The same generations with one process (the parent), per kind and per DP rank's prompts."""
    from pipeline.model import load_hf
    from pipeline.parallel import ParallelContext

    root, _, eos_id, _ = results
    with ParallelContext.from_env() as ctx:
        models = {kind: load_hf(root / kind, ctx) for kind in ("llama_kv4", "qwen2", "mistral")}
        per_kind = {kind: _all(model, None, eos_id, *_prompts()) for kind, model in models.items()}
        per_dp_rank = [_all(models["llama_kv4"], None, eos_id, *_prompts(r)) for r in range(4)]
    return per_kind, per_dp_rank


@pytest.mark.parametrize("tp,kind", [(2, "llama_kv4"), (2, "qwen2"), (2, "mistral"), (4, "llama_kv4")])
def test_every_setting_draws_the_same_tokens_at_any_tp(results, single, tp, kind):
    ranks = results[3]
    per_kind, _ = single
    for rank in ranks:
        assert rank[tp][kind] == per_kind[kind]
    assert per_kind[kind]["sample"] != per_kind[kind]["greedy"], "sampling drew the greedy tokens: no test"


def test_greedy_at_tp2_equals_transformers(results):
    _, hf, eos_id, ranks = results
    for kind in ("llama_kv4", "qwen2", "mistral"):
        for prompt, got in zip(_prompts()[0], ranks[0][2][kind]["greedy"]):
            out = hf[kind].generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                                    do_sample=False, max_new_tokens=8, eos_token_id=eos_id, pad_token_id=0)
            expected = out[0, prompt.numel():].tolist()
            expected = expected[: expected.index(eos_id) + 1] if eos_id in expected else expected
            assert got == expected


def test_zero3_model_generates_as_the_whole_model_and_gathers_once_per_call(results, single):
    _, per_dp_rank = single
    ranks = results[3]
    for rank in ranks:
        zero3 = rank["zero3"]
        assert zero3["tokens"] == per_dp_rank[zero3["dp_rank"]]
        two_steps, eight_steps = zero3["gathers"]
        assert 0 < two_steps == eight_steps, "parameters were gathered per decoding step, not once per call"

"""Hugging Face import and export of pipeline/model in one process (TP=1), against transformers itself.

Tiny random Llama (GQA, llama3 rope; and tied), Qwen2 (QKV bias) and Mistral (a sliding window
shorter than the sequence) models are saved with save_pretrained and loaded with load_hf: logits
match transformers' forward, an export is tensor-for-tensor the original and loads back in
transformers, sharded checkpoints read and write, the tokenizer travels with the export, malformed
checkpoints fail with a CheckpointError naming the problem, and document masking computes each
packed document as if it were alone.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ComputeConfig
from pipeline.model import CheckpointError, load_hf, save_hf
from tests.modelmaker import SEQ, VOCAB, hf_logits, make_hf_model, random_tokens, read_safetensors

PARITY_KINDS = ("llama_gqa", "llama_tied", "qwen2", "mistral")
TEXT = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
        "sphinx of black quartz, judge my vow", "how vexingly quick daft zebras jump!"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (folder, transformers model) for every parity kind."""
    root = tmp_path_factory.mktemp("hf")
    return {kind: (root / kind, make_hf_model(kind, root / kind)) for kind in PARITY_KINDS}


@torch.no_grad()
def _ours(model, tokens, document_ids=None):
    return model.eval()(tokens, document_ids)[..., :VOCAB]


@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_logits_match_transformers(kind, models, ctx):
    folder, reference = models[kind]
    tokens = random_tokens()
    model = load_hf(folder, ctx)
    assert model.padded_vocab == 384
    with torch.no_grad():
        logits = model.eval()(tokens)
    assert logits.shape == (2, SEQ, 384) and logits.dtype == torch.float32
    expected = hf_logits(reference, tokens)
    assert expected.std() > 0.5  # random weights of std 0.2: far from uniform
    torch.testing.assert_close(logits[..., :VOCAB], expected, atol=1e-4, rtol=0)
    assert not logits[..., VOCAB:].any(), "padded vocabulary ids must score exactly 0"


def test_mistral_window_matters(models, ctx):
    """Without the window transformers gives other logits, so the parity above checks the window."""
    import transformers

    folder, reference = models["mistral"]
    unwindowed = transformers.AutoModelForCausalLM.from_pretrained(folder, sliding_window=None).eval()
    tokens = random_tokens()
    assert reference.config.sliding_window < SEQ
    assert (hf_logits(unwindowed, tokens) - hf_logits(reference, tokens)).abs().max() > 1e-2
    torch.testing.assert_close(_ours(load_hf(folder, ctx), tokens), hf_logits(reference, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_export_is_the_original_checkpoint(kind, models, ctx, tmp_path):
    import transformers

    folder, reference = models[kind]
    export = save_hf(load_hf(folder, ctx), tmp_path / "export", ctx)
    assert export == tmp_path / "export"
    original, written = read_safetensors(folder), read_safetensors(export)
    assert set(written) == set(original)
    for name, tensor in original.items():
        assert torch.equal(written[name], tensor), name
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == [type(reference).__name__]
    assert not (tmp_path / "export.partial").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    tokens = random_tokens(seed=3)
    torch.testing.assert_close(hf_logits(reloaded, tokens), hf_logits(reference, tokens), atol=1e-6, rtol=0)
    assert reloaded.config.rope_parameters["rope_type"] == reference.config.rope_parameters["rope_type"]


def test_sharded_checkpoint_imports_equal(models, ctx, tmp_path):
    folder, _ = models["llama_gqa"]
    make_hf_model("llama_gqa", tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    tokens = random_tokens()
    assert torch.equal(_ours(load_hf(tmp_path / "sharded", ctx), tokens), _ours(load_hf(folder, ctx), tokens))


def test_small_shards_written_by_save_hf_load_in_transformers(models, ctx, tmp_path):
    import transformers

    folder, reference = models["qwen2"]
    export = save_hf(load_hf(folder, ctx), tmp_path / "export", ctx, max_shard_bytes=30_000)
    index = json.loads((export / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in export.glob("*.safetensors"))
    assert len(files) > 2 and sorted(set(index["weight_map"].values())) == files
    assert set(index["weight_map"]) == set(read_safetensors(folder))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    tokens = random_tokens()
    torch.testing.assert_close(hf_logits(reloaded, tokens), hf_logits(reference, tokens), atol=1e-6, rtol=0)


def test_tokenizer_travels_with_the_export(models, ctx, tmp_path):
    import transformers
    from tokenization.tokenizer import DEFAULT_EOS, train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXT * 5))
    tok = train_tokenizer([corpus], 280, out_path=tmp_path / "tok" / "tokenizer.json")
    export = save_hf(load_hf(models["llama_tied"][0], ctx), tmp_path / "export", ctx,
                     tokenizer=tmp_path / "tok" / "tokenizer.json")
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    for line in TEXT + ["unseen words: zygote quixotic"]:
        assert hf_tok.encode(line, add_special_tokens=False) == tok.encode(line).ids, line
    eos = tok.token_to_id(DEFAULT_EOS)
    assert hf_tok.eos_token == DEFAULT_EOS and hf_tok.eos_token_id == eos
    assert json.loads((export / "config.json").read_text())["eos_token_id"] == eos


def _edit_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(folder, edit):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


BROKEN = {
    "missing": (lambda f: _edit_tensors(f, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    "shape": (lambda f: _edit_tensors(f, lambda t: t.update({"model.norm.weight": torch.ones(63)})),
              r"'model\.norm\.weight' has shape \[63\], expected \[64\]"),
    "extra": (lambda f: _edit_tensors(f, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(3)})),
              r"unexpected tensors \['model\.layers\.0\.extra\.weight'\]"),
    "architecture": (lambda f: _edit_config(f, lambda c: c.update(architectures=["GPT2LMHeadModel"])),
                     r"unsupported architecture GPT2LMHeadModel"),
    "gelu": (lambda f: _edit_config(f, lambda c: c.update(hidden_act="gelu")), r"hidden_act='gelu'"),
    "yarn": (lambda f: _edit_config(f, lambda c: c.update(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64))),
        r"rope type 'yarn' is not supported"),
    "no_config": (lambda f: (f / "config.json").unlink(), r"no config\.json"),
    "no_safetensors": (lambda f: (f / "model.safetensors").unlink(), r"no \*\.safetensors files"),
}


@pytest.mark.parametrize("problem", list(BROKEN))
def test_bad_checkpoint_is_named(problem, models, ctx, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["llama_gqa"][0], broken)
    load_hf(broken, ctx)  # the copy is fine before the edit
    damage, message = BROKEN[problem]
    damage(broken)
    with pytest.raises(CheckpointError, match=message):
        load_hf(broken, ctx)


def test_save_refuses_a_non_empty_folder_unless_overwrite(models, ctx, tmp_path):
    model = load_hf(models["llama_gqa"][0], ctx)
    (tmp_path / "empty").mkdir()
    save_hf(model, tmp_path / "empty", ctx)  # an existing empty folder is fine
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf(model, target, ctx)
    assert (target / "notes.txt").read_text() == "keep me"
    save_hf(model, target, ctx, overwrite=True)
    assert not (target / "notes.txt").exists()
    assert set(read_safetensors(target)) == set(read_safetensors(models["llama_gqa"][0]))


@pytest.mark.parametrize("kind", ["llama_gqa", "mistral"])
def test_document_masking_computes_each_document_alone(kind, models, ctx):
    folder = models[kind][0]
    masked = load_hf(folder, ctx, ComputeConfig(document_masking=True)).eval()
    plain = load_hf(folder, ctx).eval()
    segments = torch.tensor([[0, 9, 17, -1], [0, 5, -1, -1]])
    assert plain.document_ids(segments, SEQ) is None
    ids = masked.document_ids(segments, SEQ)
    assert ids.tolist()[1] == [0] * 5 + [1] * 19
    tokens = random_tokens()
    packed = _ours(masked, tokens, ids)
    unmasked = _ours(plain, tokens)
    bounds = [[(0, 9), (9, 17), (17, SEQ)], [(0, 5), (5, SEQ)]]
    for row, docs in enumerate(bounds):
        for start, end in docs:
            alone = _ours(plain, tokens[row:row + 1, start:end])[0]
            torch.testing.assert_close(packed[row, start:end], alone, atol=1e-5, rtol=0)
            if start > 0:
                assert (unmasked[row, start:end] - alone).abs().max() > 1e-2, (row, start)
            else:
                torch.testing.assert_close(unmasked[row, start:end], alone, atol=1e-5, rtol=0)

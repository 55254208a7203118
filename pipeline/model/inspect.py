"""`distill inspect`: what a checkpoint folder holds, read from its config and file headers only.

Prints the architecture, the parameter count (total, embeddings, the rest), the layout of heads and
layers, the vocabulary facts a distillation run depends on (model vocabulary, padding per TP size,
the tokenizer's own size and end-of-document id when a tokenizer sits in the folder) and which TP
sizes the model splits over. No weight is read, so it answers at once even for a 70B teacher.

Design choice: a Hugging Face folder's counts come from the safetensors headers, not from the config,
and when they differ from what its config.json describes a WARNING line shows both numbers (a TP
checkpoint's rank files repeat replicated tensors, so its count is the model's, from its layout); the
cost is that only safetensors folders (Hugging Face or the TP format) can be inspected.
"""
from __future__ import annotations

import math
from pathlib import Path

from pipeline.config import ModelConfig
from pipeline.model.checkpoint_files import SafetensorsFolder
from pipeline.model.hf_config import model_config_from_hf
from pipeline.model.errors import ModelLayoutError
from pipeline.model.layout import check_tp, hf_shapes
from pipeline.model.tp_checkpoint import is_tp_checkpoint, read_layout
from pipeline.parallel import pad_vocab_size

TP_SIZES = (1, 2, 4, 8)


def _tensor_counts(folder: SafetensorsFolder) -> tuple[int, int, dict[str, int]]:
    """(all elements, embedding elements, bytes per dtype) over the folder's tensors."""
    total, embedding, by_dtype = 0, 0, {}
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1}
    for name in folder.names():
        count = math.prod(folder.shape(name))
        total += count
        if "embed" in name or "lm_head" in name:
            embedding += count
        dtype = folder.dtype(name)
        by_dtype[dtype] = by_dtype.get(dtype, 0) + count * sizes.get(dtype, 0)
    return total, embedding, by_dtype


def _tokenizer_lines(path: Path, cfg: ModelConfig) -> list[str]:
    if not (path / "tokenizer.json").is_file():
        return ["tokenizer        none in this folder"]
    from tokenization.tokenizer import DEFAULT_EOS, load_tokenizer, vocab_size

    tok = load_tokenizer(path)
    size = vocab_size(tok)
    eos = tok.token_to_id(DEFAULT_EOS)
    lines = [f"tokenizer        {size} ids; {DEFAULT_EOS} = {eos}"]
    if size > cfg.vocab_size:
        lines.append(f"WARNING          the tokenizer emits ids up to {size - 1} but the model scores only "
                     f"{cfg.vocab_size}")
    return lines


def _split_line(cfg: ModelConfig) -> str:
    ok = []
    for tp in TP_SIZES:
        try:
            check_tp(cfg, tp, "cpu")
            ok.append(str(tp))
        except ModelLayoutError:
            try:
                check_tp(cfg, tp, "cuda")
                ok.append(f"{tp} (CUDA only)")
            except ModelLayoutError:
                pass
    return "splits over tp   " + (", ".join(ok) or "none of " + ", ".join(map(str, TP_SIZES)))


def describe(path: str | Path) -> str:
    """The report `distill inspect` prints for a Hugging Face or TP checkpoint folder."""
    path = Path(path)
    if is_tp_checkpoint(path):
        cfg, layout = read_layout(path)
        kind = f"TP checkpoint, tp={layout['tp']}, padded vocabulary {layout['padded_vocab']}"
    else:
        cfg, layout = model_config_from_hf(path), None
        kind = "Hugging Face folder"
    total, embedding, by_dtype = _tensor_counts(SafetensorsFolder(path))
    if layout is not None:  # rank files repeat replicated tensors and hold padded rows: count the model itself
        shapes = hf_shapes(cfg)
        total = sum(math.prod(shape) for shape in shapes.values())
        embedding = sum(math.prod(shape) for name, shape in shapes.items() if "embed" in name or "lm_head" in name)
    warnings = []
    if layout is None and total != (described := sum(math.prod(shape) for shape in hf_shapes(cfg).values())):
        warnings.append(f"WARNING          the files hold {total:,} parameters but config.json describes "
                        f"{described:,}")
    rope = cfg.rope_scaling if cfg.rope_scaling == "none" else f"{cfg.rope_scaling} ×{cfg.rope_factor:g}"
    lines = [
        f"{path}: {kind}",
        f"architecture     {cfg.architecture}",
        f"parameters       {total:,} ({embedding:,} in embeddings, {total - embedding:,} in the rest)",
        f"stored           " + ", ".join(f"{n / 2**20:,.1f} MiB {d}" for d, n in sorted(by_dtype.items())),
        f"layers           {cfg.num_layers} × (hidden {cfg.hidden_size}, ffn {cfg.intermediate_size})",
        f"attention        {cfg.num_heads} heads, {cfg.kv_heads} key/value heads, head dim {cfg.head_size}"
        + (f", sliding window {cfg.sliding_window}" if cfg.sliding_window else "")
        + (", QKV bias" if cfg.qkv_bias else ""),
        f"rotary           theta {cfg.rope_theta:g}, scaling {rope}",
        f"embeddings       {'tied' if cfg.tie_embeddings else 'untied'} input and output",
        f"vocabulary       {cfg.vocab_size}; padded for tp " + ", ".join(
            f"{tp}: {pad_vocab_size(cfg.vocab_size, tp)}" for tp in TP_SIZES) + " (vocab_multiple 128)",
        _split_line(cfg),
    ]
    return "\n".join(lines + warnings + _tokenizer_lines(path, cfg)) + "\n"

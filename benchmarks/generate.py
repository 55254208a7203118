"""Decode tokens/s of our `pipeline.generate.generate` against transformers' `model.generate`, same run, CPU.

Builds a random `transformers.LlamaForCausalLM` (default: hidden 512, 8 layers, 8 heads, 4 KV heads,
intermediate 1408, vocabulary 32000, untied, float32), saves it with `save_pretrained` to a temporary
folder and loads it twice in this process:
- **transformers**: `LlamaForCausalLM.from_pretrained(folder)` (sdpa attention), `model.generate` with
  its dynamic KV cache (`use_cache=True`, the default);
- **ours**: `pipeline.model.load_hf(folder, ctx)` at TP 1 (a gloo world of one), `generate(...)` with
  our KV cache (`pipeline/generate/kv_cache.py`).
Both get the same `[batch, prompt_len]` random prompts (equal lengths, so no padding on either side),
run under `torch.no_grad()` with this process's torch threads, and generate exactly `--new-tokens`
tokens per row: EOS is switched off on both (transformers' generation_config.eos_token_id = None,
ours eos_id=None), so neither stops early. Modes: greedy, and sampled with top-k 30 (temperature 1).

Prefill is reported separately: a call with max_new_tokens=1 (prefill plus one token choice) is timed
too, and decode tokens/s = batch × (new_tokens − 1) / (t(new_tokens) − t(1)); the "total" column counts
the prefill (batch × new_tokens / t(new_tokens)). Each time is the fastest of `--rounds` rounds, and
the rounds interleave the two implementations, so a burst of load on a shared machine hits one round
rather than one implementation. The ratio is ours / transformers decode tokens/s. The sanity column
counts greedy rows whose tokens are identical between the two.

`--part cache` measures the teacher-sampled cache job (`distill cache` with `prefixes.source: teacher`)
against generation alone on the same model: token shards of `--cache-samples` random samples of
prompt_len + new_tokens ids are written; the job continues each sample's first prompt_len ids with
top-k 30 sampling and writes the generated shards and the top-32 targets along them; "generation alone"
is `generate` on the same prompts, keys, seed and batches of 16 (so it draws the same tokens), with the
model loaded the same way. Both are timed end to end (model load included, the job's shard reading,
its targets from the decoder's logits at every real position, encoding and writing too); the ratio is
the job's generated tokens/s over generation's (target ≥ 0.9).

Trade-offs: random weights (speed does not depend on them), one small config, TP 1 only, CPU only;
process start and imports are not timed, nor checkpoint loading in the decode part.
Run: .venv/bin/python benchmarks/generate.py [--part decode cache] [--batch 1 16] [--prompt-len 64]
     [--new-tokens 64] [--rounds 2] [--cache-samples 64]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")  # no Apex/TE/CUDA on CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ("greedy", "top-k 30")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", nargs="+", choices=("decode", "cache"), default=["decode", "cache"])
    p.add_argument("--cache-samples", type=int, default=64)
    return p.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_checkpoint(args: argparse.Namespace, folder: Path) -> None:
    import transformers
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)


class Transformers:
    name = "transformers"

    def __init__(self, folder: Path):
        import transformers
        self.model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                   attn_implementation="sdpa").eval()
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0

    def __call__(self, prompts: torch.Tensor, mode: str, new: int) -> torch.Tensor:
        sample = dict(do_sample=True, top_k=30, top_p=1.0, temperature=1.0) if mode != "greedy" else \
            dict(do_sample=False, top_k=None, top_p=None, temperature=None)
        out = self.model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new,
                                  min_new_tokens=new, **sample)
        return out[:, prompts.shape[1]:]


class Ours:
    name = "ours"

    def __init__(self, folder: Path):
        from pipeline.model import load_hf
        from pipeline.parallel import ParallelContext
        self.ctx = ParallelContext.from_env(tp=1, backend="gloo")
        self.model = load_hf(folder, self.ctx).eval()
        self.vocab = self.model.model_config.vocab_size

    def __call__(self, prompts: torch.Tensor, mode: str, new: int) -> torch.Tensor:
        from pipeline.config import SamplingConfig
        from pipeline.generate import generate
        sampling = SamplingConfig(mode="greedy" if mode == "greedy" else "sample", top_k=30 if mode != "greedy" else 0,
                                  max_new_tokens=new)
        keys = [f"row-{i}" for i in range(prompts.shape[0])]
        out = generate(self.model, list(prompts), keys, sampling, vocab_size=self.vocab, eos_id=None, seed=0,
                       group=self.ctx.tp_group)
        return torch.stack(out.tokens)


def timed(fn, *args) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(*args)
    return time.perf_counter() - start, out


def measure(impls, args: argparse.Namespace) -> tuple[dict, dict]:
    """({(impl, batch, mode, new): fastest seconds}, {(impl, batch): greedy tokens})."""
    best, greedy = {}, {}
    for impl in impls:  # warm-up: first calls allocate and JIT-select kernels
        impl(torch.randint(0, args.vocab, (2, args.prompt_len)), "greedy", 4)
    for _ in range(args.rounds):
        for batch in args.batch:
            prompts = torch.randint(0, args.vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(7))
            for mode in MODES:
                for new in (1, args.new_tokens):
                    for impl in impls:
                        seconds, out = timed(impl, prompts, mode, new)
                        assert out.shape == (batch, new), (impl.name, out.shape)
                        key = (impl.name, batch, mode, new)
                        best[key] = min(best.get(key, float("inf")), seconds)
                        if mode == "greedy" and new == args.new_tokens:
                            greedy[(impl.name, batch)] = out
    return best, greedy


def table(best: dict, greedy: dict, args: argparse.Namespace) -> list[str]:
    n = args.new_tokens
    rows = ["| batch | mode | implementation | prefill+1 s | decode tokens/s | total tokens/s | ours / transformers "
            "(decode) | greedy rows equal |", "|---|---|---|---|---|---|---|---|"]
    for batch in args.batch:
        for mode in MODES:
            rate = {}
            for name in ("transformers", "ours"):
                first, full = best[(name, batch, mode, 1)], best[(name, batch, mode, n)]
                rate[name] = batch * (n - 1) / max(full - first, 1e-9)
                ratio = f"{rate['ours'] / rate['transformers']:.2f}" if name == "ours" else "1.00"
                same = ""
                if mode == "greedy" and name == "ours":
                    equal = (greedy[("ours", batch)] == greedy[("transformers", batch)]).all(dim=1)
                    same = f"{int(equal.sum())}/{batch}"
                rows.append(f"| {batch} | {mode} | {name} | {first:.3f} | {rate[name]:.1f} | {batch * n / full:.1f} | "
                            f"{ratio} | {same} |")
    return rows


def write_token_shards(args: argparse.Namespace, folder: Path) -> int:
    """A token-shard folder of `--cache-samples` random samples (seq_len = prompt + new − 1); the EOS id is
    the last id, which the prompts never hold. Returns the EOS id."""
    import hashlib

    from tokenization.format import SHARD_SUFFIX, Manifest, ShardEntry, ShardWriter, encode_sample, write_manifest
    folder.mkdir(parents=True)
    seq_len, eos = args.prompt_len + args.new_tokens - 1, args.vocab - 1
    ids = torch.randint(0, eos, (args.cache_samples, seq_len + 1), generator=torch.Generator().manual_seed(3))
    dtype = "uint16" if args.vocab < 65536 else "uint32"
    name = f"bench-00000{SHARD_SUFFIX}"
    with open(folder / name, "wb") as file, ShardWriter(file) as writer:
        for row, tokens in enumerate(ids.numpy().astype(dtype)):
            writer.write(encode_sample(f"s{row:05d}", tokens, torch.tensor([0, seq_len + 1]).int().numpy()))
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    write_manifest(folder, Manifest("b" * 64, args.vocab, eos, seq_len, "concat",
                                    (ShardEntry(name, args.cache_samples, ids.numel(), digest),), "benchmarks"))
    return eos


def measure_cache(args: argparse.Namespace, folder: Path, tmp: Path) -> list[str]:
    """The teacher-sampled cache job against generation alone, same prompts and draws."""
    from pipeline.config import CacheConfig, SamplingConfig, from_dict
    from pipeline.data.dataset import TokenShardDataset
    from pipeline.generate import generate
    from pipeline.model import load_hf
    from pipeline.parallel import ParallelContext
    from pipeline.teacher.job import run_cache

    eos = write_token_shards(args, tmp / "tokens")
    batch = 16
    data = TokenShardDataset(str(tmp / "tokens"), micro_batch=args.cache_samples, dp_rank=0, dp_size=1, seed=0,
                             shuffle=False).batch(0)
    start = time.perf_counter()
    with ParallelContext.from_env(tp=1, backend="gloo") as ctx:
        model = load_hf(folder, ctx).eval()
        sampling = SamplingConfig(top_k=30, max_new_tokens=args.new_tokens)
        generated = 0
        for row in range(0, args.cache_samples, batch):
            prompts = [t[: args.prompt_len] for t in data["tokens"][row: row + batch]]
            out = generate(model, prompts, data["keys"][row: row + batch], sampling, vocab_size=args.vocab,
                           eos_id=eos, seed=args.seed, group=ctx.tp_group)
            generated += out.new_tokens
    alone = time.perf_counter() - start
    cfg = from_dict(CacheConfig, {
        "seed": args.seed, "teacher": str(folder), "tokens": str(tmp / "tokens"), "output": str(tmp / "cache"),
        "micro_batch": batch, "progress": False, "targets": {"mode": "topk", "k": 32},
        "prefixes": {"source": "teacher", "prompt_len": args.prompt_len,
                     "sampling": {"top_k": 30, "max_new_tokens": args.new_tokens}}})
    start = time.perf_counter()
    summary = run_cache(cfg)
    job = time.perf_counter() - start
    job_tokens = summary.get("generated_tokens", generated)
    return ["| what | seconds | generated tokens | generated tokens/s | / generation alone |", "|---|---|---|---|---|",
            f"| generation alone (load + generate) | {alone:.2f} | {generated} | {generated / alone:.1f} | 1.00 |",
            f"| teacher-sampled cache job | {job:.2f} | {job_tokens} | {job_tokens / job:.1f} | "
            f"{(job_tokens / job) / (generated / alone):.2f} |"]


def main(argv=None) -> None:
    args = parse_args(argv)
    import transformers
    print(f"Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} KV), intermediate "
          f"{args.intermediate}, vocab {args.vocab}, float32; prompt {args.prompt_len} tokens, {args.new_tokens} new "
          f"tokens per row; TP 1; {torch.get_num_threads()} torch threads on {os.cpu_count()} cores "
          f"({cpu_model()}); torch {torch.__version__}, transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        make_checkpoint(args, folder)
        if "decode" in args.part:
            impls = [Transformers(folder), Ours(folder)]
            best, greedy = measure(impls, args)
            impls[1].ctx.destroy()
            print(f"\ndecode (EOS off), fastest of {args.rounds} rounds")
            print("\n".join(table(best, greedy, args)))
        if "cache" in args.part:
            print(f"\nteacher-sampled cache job, {args.cache_samples} samples, top-k 30, batches of 16")
            print("\n".join(measure_cache(args, folder, Path(tmp))))


if __name__ == "__main__":
    main()

"""The teacher-cache job's tokens/s against the teacher's forward alone, its bytes/token against the storage
floor, and the codecs' decode speed, same run, CPU.

Three tables:

1. **Job throughput.** Builds a random `transformers.LlamaForCausalLM` (default: hidden 768, 12 layers, 12
   heads, 4 KV heads, intermediate 2048, vocabulary 32000, untied, float32: a GPT-2-small-sized teacher; the
   output layer's weights are redrawn with std `--lm-head-std` so its logits are peaked like a trained
   model's rather than near uniform) saved with `save_pretrained` to a temporary folder, and token shards
   with `tests.shardmaker.make_token_shards` (default 4 shards × 4 samples, seq_len 512). The **baseline**
   is the teacher's forward alone: `pipeline.model.load_model` in a world-of-one `ParallelContext` in this
   process, then `model(tokens[:, :-1])` under `torch.inference_mode()` for every micro-batch of 4 of the
   same samples, tokens already in memory (loading not timed; no warm-up, as the job's first forward is
   timed too). The **job** is `run_cache` on the same
   teacher and shards, writing to a fresh folder, with top-K targets (K = 32) and with sampled targets
   (N = 50); its tokens/s is the summary's, measured over the shard loop only (reading and verifying the
   token shards, forward, targets, encoding, tar writing and fsync; teacher loading and hashing excluded).
   Rounds of (forward, top-K job, sampled job) repeat `--rounds` times, interleaved, and each row keeps its
   fastest round; ratio = job tokens/s ÷ forward tokens/s. Target: ≥ 0.9.
2. **Bytes per token.** No model: per position, logits over V shaped like a language model's, z = −a·L −
   b·L² + noise with L = log(rank), ranks a random permutation of the ids (a shared random permutation,
   cyclically shifted per position), a drawn per position in [`--zipf-low`, `--zipf-high`], b = `--zipf-curve`
   and Gaussian noise of std `--noise`. The defaults give a top-1 probability mostly in 0.15–0.55 and about
   13 distinct ids in N = 50 draws, near what the literature reports for real LMs (the mean is printed).
   Targets come from `topk_targets` / `sampled_targets` (uniforms from a seeded generator), are encoded by
   `TopkCodec` (value bits from `choose_value_bits`) / `SampledCodec`, and written as real cache shards with
   `CacheShardWriter`, so bytes include the tar headers: bytes/token = shard file size ÷ positions. The floor
   is the codec's: log2 C(V, K) / 8 per position for top-K, the mean of log2 C(V, U) + log2 C(N−1, U−1) over
   positions for sampled. The fixed-width baseline is how public caches store it: K × (⌈log2 V⌉-bit id +
   fp16 value) + a 4-byte float32 rest for top-K, U × (⌈log2 V⌉-bit id + fp16 value) for sampled. Targets:
   ≤ 1.5 × floor + 4 bytes (the float32 rest field) for top-K, ≤ 1.5 × floor for sampled.
3. **Decode throughput.** With `torch.set_num_threads(1)`, the codec's `decode` of every sample of three of
   table 2's shards (already read into memory), best of `--decode-repeats`; positions/s. Target ≥ 1M/s.

Trade-offs: random weights and synthetic distributions (speed of the forward does not depend on the
weights; the job's sampled encoding depends on the number of distinct ids, hence the peaked output layer);
one small teacher on CPU, where the forward dominates far more than on a GPU, so the ratio here bounds
the job's overhead only for CPU-speed teachers; table 2's byte counts for a given K depend only on V, K,
positions and value bits (Elias–Fano sizes depend on counts, not on which ids), but sampled sizes depend on
the distributions' spread, which is synthetic.
Run: .venv/bin/python benchmarks/cache.py [--rounds 2] [--samples 8 --positions 2048] [--part all]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")  # no Apex/TE/CUDA on CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# --- table 1: the job against the forward -------------------------------------------------------------------

def load_batches(tokens_folder: Path, micro_batch: int) -> list[torch.Tensor]:
    """Every sample of the token shards as int64 micro-batches [B, seq_len + 1], in shard order."""
    from pipeline.data.shards import ShardReader
    from pipeline.data.sources import ShardSet
    from tokenization.format import decode_sample
    shards = ShardSet(str(tokens_folder))
    manifest = shards.manifest
    samples = []
    for index, entry in enumerate(manifest.shards):
        reader = ShardReader(shards.url(index), expected=entry.samples, where=entry.name)
        for raw in reader.take(entry.samples):
            tokens, _ = decode_sample(raw, seq_len=manifest.seq_len, dtype=manifest.dtype, where=entry.name)
            samples.append(np.asarray(tokens).astype(np.int64))
        reader.close()
    stacked = torch.from_numpy(np.stack(samples))
    return list(stacked.split(micro_batch))


def time_forward(teacher: Path, batches: list[torch.Tensor]) -> float:
    """Tokens/s of the teacher's forward alone over `batches`, from a freshly loaded model as in the job
    (whose timed loop also includes its first forward, so no warm-up here)."""
    from pipeline.model import load_model
    from pipeline.parallel import ParallelContext
    with ParallelContext.from_env(tp=1) as ctx:
        model = load_model(str(teacher), ctx).eval()
        with torch.inference_mode():
            start = time.perf_counter()
            for batch in batches:
                model(batch[:, :-1])
            elapsed = time.perf_counter() - start
        del model
    return sum(b.shape[0] * (b.shape[1] - 1) for b in batches) / elapsed


def time_job(args: argparse.Namespace, teacher: Path, tokens: Path, output: Path, mode: str) -> dict:
    from pipeline.config import CacheConfig, from_dict
    from pipeline.teacher.job import run_cache
    cfg = from_dict(CacheConfig, {"teacher": str(teacher), "tokens": str(tokens), "output": str(output),
                                  "progress": False, "micro_batch": args.micro_batch,
                                  "targets": {"mode": mode, "k": args.k, "draws": args.draws}})
    return run_cache(cfg)


def measure_job(args: argparse.Namespace) -> dict:
    """{row: [tokens/s per round]} and the job summaries' bytes/token."""
    from benchmarks.model import make_checkpoint  # the model benchmark's teacher builder
    from tests.shardmaker import make_token_shards

    results: dict = {"forward": [], "topk": [], "sampled": []}
    stored: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        base = Path(tmp)
        make_checkpoint(args, base / "teacher", lm_head_std=args.lm_head_std)
        make_token_shards(base / "tokens", [args.samples_per_shard] * args.shards, seq_len=args.seq_len,
                          vocab_size=args.vocab, seed=args.seed)
        batches = load_batches(base / "tokens", args.micro_batch)
        for round_index in range(args.rounds):
            results["forward"].append(time_forward(base / "teacher", batches))
            for mode in ("topk", "sampled"):
                summary = time_job(args, base / "teacher", base / "tokens", base / f"out-{mode}-{round_index}", mode)
                if not summary["complete"]:
                    raise RuntimeError(f"the {mode} job did not complete: {summary}")
                results[mode].append(summary["tokens_per_s"])
                stored[mode] = summary["bytes_per_token"]
            print(f"  round {round_index + 1}/{args.rounds}: " + ", ".join(
                f"{name} {values[-1]:,.0f} tok/s" for name, values in results.items()), file=sys.stderr)
    return {"rounds": results, "bytes_per_token": stored}


def print_job_table(args: argparse.Namespace, measured: dict) -> None:
    rounds = measured["rounds"]
    forward = max(rounds["forward"])
    print("### 1. Job throughput vs the teacher's forward alone\n")
    print(f"Llama hidden={args.hidden} layers={args.layers} heads={args.heads} kv_heads={args.kv_heads} "
          f"intermediate={args.intermediate} vocab={args.vocab}, float32; {args.shards} shards × "
          f"{args.samples_per_shard} samples × seq_len {args.seq_len} = "
          f"{args.shards * args.samples_per_shard * args.seq_len} tokens, micro_batch {args.micro_batch}; "
          f"best of {args.rounds} interleaved rounds\n")
    print("| run | targets | tokens/s | vs forward | bytes/token | round spread | target ≥ 0.9 |")
    print("|---|---|---|---|---|---|---|")
    rows = [("teacher forward alone", "-", "forward"), ("run_cache", f"topk K={args.k}", "topk"),
            ("run_cache", f"sampled N={args.draws}", "sampled")]
    for name, targets, key in rows:
        best = max(rounds[key])
        ratio = best / forward
        stored = measured["bytes_per_token"].get(key)
        print(f"| {name} | {targets} | {best:,.0f} | {ratio:.2f} | {'-' if stored is None else f'{stored:.2f}'} | "
              f"{best / min(rounds[key]):.2f} | {'-' if key == 'forward' else ('met' if ratio >= 0.9 else 'NOT met')} |")
    print()


# --- table 2: bytes per token -------------------------------------------------------------------------------

class Distributions:
    """Seeded LM-like logits over V, a few hundred positions at a time (see the module docstring)."""

    def __init__(self, vocab: int, args: argparse.Namespace, seed: int):
        self.vocab, self.args = vocab, args
        self.generator = torch.Generator().manual_seed(seed)
        ranks = torch.randperm(vocab, generator=self.generator)
        self.log_rank = torch.log1p(ranks.double()).float()  # log(rank), rank 1 for the top id
        self.columns = torch.arange(vocab)

    def next(self, rows: int) -> torch.Tensor:
        args, g = self.args, self.generator
        a = args.zipf_low + (args.zipf_high - args.zipf_low) * torch.rand(rows, 1, generator=g)
        shift = torch.randint(0, self.vocab, (rows, 1), generator=g)
        log_rank = self.log_rank[(self.columns + shift) % self.vocab]
        z = torch.randn(rows, self.vocab, generator=g).mul_(args.noise)
        z -= a * log_rank
        z -= args.zipf_curve * log_rank.square_()
        return z


def encode_sample(c: dict, pieces: list, positions: int) -> tuple[bytes, float]:
    """One sample's record and its floor bits; counts distinct sampled ids into c["unique"]."""
    codec = c["codec"]
    if c["mode"] == "topk":
        return codec.encode(*pieces), codec.floor_bits() * positions
    ids, counts = pieces
    unique = (ids >= 0).sum(axis=1)
    width = max(1, int(unique.max()))
    c["unique"] += int(unique.sum()) * c["copies"]
    return codec.encode(ids[:, :width], counts[:, :width]), float(codec.floor_bits(unique).sum())


def write_shards(args: argparse.Namespace, vocab: int, folder: Path) -> list[dict]:
    """Write one cache shard per (mode, K/N) at this V; return each one's row facts and codec."""
    from pipeline.teacher.codec import SampledCodec, TopkCodec, choose_value_bits
    from pipeline.teacher.format import MEMBERS
    from pipeline.teacher.identity import PROGRESS_DIR
    from pipeline.teacher.targets import sampled_targets, topk_targets
    from pipeline.teacher.writer import CacheShardWriter
    from tokenization.format import ShardEntry

    positions, samples, copies = args.positions, args.samples, args.copies
    (folder / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)  # the writer's done records (the job makes it)
    configs = []
    for k in args.ks:
        bits = choose_value_bits(vocab, k, positions)
        configs.append({"mode": "topk", "n": k, "bits": bits, "codec": TopkCodec(vocab, k, positions, bits)})
    configs.append({"mode": "sampled", "n": args.draws, "bits": None, "codec": SampledCodec(vocab, args.draws, positions)})
    for c in configs:
        c["name"] = f"{c['mode']}-v{vocab}-n{c['n']}.tar"
        c["path"] = folder / c["name"]
        c["floor_bits"] = 0.0
        c["unique"] = 0
        c["copies"] = copies
        source = ShardEntry(f"source-{c['name']}", samples * copies, samples * copies * (positions + 1), "0" * 64)
        c["writer"] = CacheShardWriter(folder, c["name"], source=source)
    dists = Distributions(vocab, args, seed=args.seed + vocab)
    uniforms_gen = torch.Generator().manual_seed(args.seed + 1)
    top1 = []
    for sample in range(samples):
        parts: dict = {id(c): [] for c in configs}
        for start in range(0, positions, args.chunk):
            z = dists.next(min(args.chunk, positions - start))
            top1.append(z.softmax(-1).amax(-1) if len(top1) < 8 else None)
            for c in configs:
                if c["mode"] == "topk":
                    found = topk_targets(z, k=c["n"])
                else:
                    uniforms = torch.rand(z.shape[0], c["n"], generator=uniforms_gen, dtype=torch.float64)
                    found = sampled_targets(z, uniforms)
                parts[id(c)].append([t.numpy() for t in found])
            del z
        for c in configs:
            payload, floor = encode_sample(c, [np.concatenate(p) for p in zip(*parts[id(c)])], positions)
            for copy in range(copies):  # a shard of realistic length: the tar's end padding amortises as in use
                c["writer"].write(f"s{sample:06d}-{copy:03d}", MEMBERS[c["mode"]], payload, positions=positions,
                                  floor_bits=floor)
            c["floor_bits"] += floor * copies
    top1 = torch.cat([t for t in top1 if t is not None])
    rows = []
    total = samples * copies * positions
    id_bits = math.ceil(math.log2(vocab))
    for c in configs:
        c["writer"].close()
        size = c["path"].stat().st_size
        mean_unique = c["unique"] / total if c["mode"] == "sampled" else c["n"]
        fixed = (c["n"] * (id_bits + 16) / 8 + 4) if c["mode"] == "topk" else mean_unique * (id_bits + 16) / 8
        rows.append({"mode": c["mode"], "vocab": vocab, "n": c["n"], "bits": c["bits"], "bytes": size / total,
                     "floor": c["floor_bits"] / 8 / total, "fixed": fixed, "unique": mean_unique,
                     "path": c["path"], "codec": c["codec"],
                     "top1": [float(q) for q in top1.quantile(torch.tensor([0.1, 0.5, 0.9]))]})
    return rows


def print_bytes_table(args: argparse.Namespace, rows: list[dict]) -> None:
    print("### 2. Bytes per token against the storage floor\n")
    print(f"{args.samples} distinct samples × {args.copies} copies × {args.positions} positions per shard, "
          f"synthetic LM-like distributions "
          f"(a ∈ [{args.zipf_low}, {args.zipf_high}], b = {args.zipf_curve}, noise std {args.noise}); "
          "top-1 probability q10/q50/q90: " + "; ".join(
              f"V={r['vocab']} {'/'.join(f'{q:.2f}' for q in r['top1'])}" for r in rows if r["mode"] == "sampled")
          + "\n")
    print("| mode | V | K or N | value bits | mean distinct ids | bytes/token | floor bytes/token | ratio | "
          "fixed-width bytes/token | vs fixed-width | target | met |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["mode"] == "topk":
            limit, target = 1.5 * r["floor"] + 4, "≤ 1.5 × floor + 4"
        else:
            limit, target = 1.5 * r["floor"], "≤ 1.5 × floor"
        print(f"| {r['mode']} | {r['vocab']} | {'K' if r['mode'] == 'topk' else 'N'}={r['n']} | "
              f"{r['bits'] if r['bits'] is not None else '-'} | {r['unique']:.1f} | {r['bytes']:.2f} | "
              f"{r['floor']:.2f} | {r['bytes'] / r['floor']:.2f} | {r['fixed']:.2f} | {r['bytes'] / r['fixed']:.2f} | "
              f"{target} ({limit:.2f}) | {'yes' if r['bytes'] <= limit else 'NO'} |")
    print()


# --- table 3: decode ----------------------------------------------------------------------------------------

def time_decode(row: dict, repeats: int) -> tuple[float, int]:
    """(best seconds to decode every sample of the row's shard, positions decoded)."""
    with tarfile.open(row["path"]) as tar:
        payloads = [tar.extractfile(m).read() for m in tar.getmembers()]
    codec = row["codec"]
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for payload in payloads:
            codec.decode(payload)
        best = min(best, time.perf_counter() - start)
    return best, len(payloads) * codec.positions


def print_decode_table(args: argparse.Namespace, rows: list[dict]) -> None:
    torch.set_num_threads(1)
    picked = [r for r in rows if (r["vocab"], r["mode"], r["n"]) in
              {(128256, "topk", 32), (128256, "sampled", args.draws), (32000, "topk", 32)}] or rows[:1]
    print("### 3. Decode throughput, one thread\n")
    print(f"torch threads 1, numpy; every sample of the shard, best of {args.decode_repeats}\n")
    print("| mode | V | K or N | samples × positions | s | positions/s | target ≥ 1,000,000 |")
    print("|---|---|---|---|---|---|---|")
    for r in picked:
        seconds, positions = time_decode(r, args.decode_repeats)
        rate = positions / seconds
        print(f"| {r['mode']} | {r['vocab']} | {'K' if r['mode'] == 'topk' else 'N'}={r['n']} | "
              f"{positions // r['codec'].positions} × {r['codec'].positions} | {seconds:.3f} | {rate:,.0f} | "
              f"{'met' if rate >= 1e6 else 'NOT met'} |")
    print()


# --- main ----------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--part", choices=["all", "job", "bytes"], default="all",
                        help="job = table 1 only; bytes = tables 2 and 3 only")
    job = parser.add_argument_group("table 1: the job")
    job.add_argument("--rounds", type=int, default=2, help="interleaved rounds (forward, topk job, sampled job)")
    job.add_argument("--hidden", type=int, default=768, help="teacher hidden size")
    job.add_argument("--layers", type=int, default=12, help="teacher decoder layers")
    job.add_argument("--heads", type=int, default=12, help="teacher attention heads")
    job.add_argument("--kv-heads", type=int, default=4, help="teacher key/value heads (GQA)")
    job.add_argument("--intermediate", type=int, default=2048, help="teacher MLP intermediate size")
    job.add_argument("--vocab", type=int, default=32000, help="teacher and token-shard vocabulary size")
    job.add_argument("--lm-head-std", type=float, default=0.1,
                     help="std of the output layer's random weights (peaked logits like a trained model's)")
    job.add_argument("--shards", type=int, default=4, help="token shards")
    job.add_argument("--samples-per-shard", type=int, default=4, help="samples per token shard")
    job.add_argument("--seq-len", type=int, default=512, help="tokens per sample")
    job.add_argument("--micro-batch", type=int, default=4, help="samples per forward, both sides")
    job.add_argument("--k", type=int, default=32, help="top-K of the topk job")
    job.add_argument("--draws", type=int, default=50, help="N draws of the sampled job and of table 2")
    size = parser.add_argument_group("tables 2 and 3: bytes and decode")
    size.add_argument("--vocabs", type=int, nargs="+", default=[32000, 128256], help="vocabulary sizes")
    size.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64], help="top-K values")
    size.add_argument("--samples", type=int, default=8, help="samples per shard")
    size.add_argument("--positions", type=int, default=2048, help="positions per sample")
    size.add_argument("--copies", type=int, default=32,
                      help="each distinct sample is written this many times (new keys), so a shard is as long as "
                           "a real one and the tar's end-of-archive padding (up to 10 KiB) weighs as it would")
    size.add_argument("--chunk", type=int, default=256, help="positions generated and processed at a time")
    size.add_argument("--zipf-low", type=float, default=0.3, help="smallest a of z = −a·log r − b·log² r")
    size.add_argument("--zipf-high", type=float, default=1.5, help="largest a")
    size.add_argument("--zipf-curve", type=float, default=0.25, help="b, the tail's extra steepness")
    size.add_argument("--noise", type=float, default=0.5, help="std of the Gaussian noise added to the logits")
    size.add_argument("--decode-repeats", type=int, default=3, help="decode passes (best taken)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, tokens and distributions")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import transformers
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}; "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start\n")
    if args.part in ("all", "job"):
        print_job_table(args, measure_job(args))
    if args.part in ("all", "bytes"):
        with tempfile.TemporaryDirectory(prefix="bench-cache-bytes-") as tmp:
            rows = []
            for vocab in args.vocabs:
                started = time.perf_counter()
                rows += write_shards(args, vocab, Path(tmp))
                print(f"  V={vocab}: shards written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
            print_bytes_table(args, rows)
            print_decode_table(args, rows)


if __name__ == "__main__":
    main()

"""The student's training step time with distillation targets against CE-only training, same run, CPU.

Writes random token shards (`tests.shardmaker.make_token_shards`, default 4 shards, enough samples for every
step of one run, seq_len 256, V = 32000) and a random Llama teacher (`benchmarks.model.make_checkpoint`, small:
its speed is not measured, only its cache is used; output layer redrawn with std `--lm-head-std` so its
distributions are peaked like a trained model's), then runs the real cache job (`run_cache`) over the shards
for top-K (K = 32) and, with `--modes` including it, sampled (N = 50) targets. Then it trains the same student
(default: hidden 512, 4 layers, 8 heads, 4 KV heads, intermediate 1408, untied, float32; DeepSpeed ZeRO-3 in
a world of one, gloo) with `python -m pipeline train` in a fresh process per configuration:

- **ce**: `loss.divergence=ce`, no teacher cache (the baseline);
- **topk**: `loss.divergence=kl`, `loss.target_mode=tail`, the top-K cache joined as sidecar;
- **sampled**: `loss.divergence=kl`, the sampled cache;
- **online**: `loss.divergence=kl` against `teacher.online` (the same teacher run beside the student: dense
  targets on the corpus prefixes);
- **onpolicy**: `loss.divergence=rkl` with `loss.prefixes.student=1`: every row's first `--prompt-len` tokens
  continued by the student (up to `--new-tokens`) before the step, and scored by the online teacher.

Everything else is the same: seed, data, micro-batch, `data.num_workers` (default 1, as in
configs/student_kd.yaml), no checkpoints, no eval, no TensorBoard, no console lines. Each run's
`metrics.jsonl` gives per step `perf/step_time_s` (data wait + teacher-target decode or teacher forward +
generation + forward, loss, backward, optimizer step), `perf/data_wait_fraction`, and for the online runs
`perf/teacher_s` (teacher forwards) and `perf/generate_student_s` (the student's decoding); the first
`--warmup` steps are dropped. Step time is the median over the remaining steps; tokens/s = the median
counted tokens of a step (every position; on-policy, the generated ones) ÷ that median; the data-wait
fraction is Σ wait ÷ Σ step time over the same steps. The set of runs repeats `--rounds` times, interleaved
(ce, topk, sampled, ce, ...), and each row keeps its fastest round (by median step time); the spread column
is slowest ÷ fastest round. Ratio = step time ÷ CE's step time. Target for topk: ≤ 1.1. The online row
is also compared with its floor, CE's step time + the median teacher forward (`perf/teacher_s`) of the same
online run (target ≤ 1.1: dense KD should cost little beyond running the teacher), and the on-policy step is
split into generation, teacher scoring and the student's own step (the rest, data wait excluded). The teacher
is `--teacher-hidden`/`--teacher-layers` (default small, so its forward is mostly the V-wide output layer).

`--breakdown` adds, in this process with the same thread count, what the distillation path adds to a step:
the teacher-target decode of one micro-batch (`CacheTargets.targets`, which runs in the training process) and
forward+backward of `distill_loss` on random logits of the student's shape, CE against top-K and sampled.

Trade-offs: random tokens and weights (speed does not depend on them; the sampled cache's width does, hence
the peaked teacher); one small student on CPU, where the student's own matmuls are cheap next to a GPU's,
so the loss and decode weigh more here than there; process start, DeepSpeed set-up and the end checkpoint
are outside `perf/step_time_s`.
Run: .venv/bin/python benchmarks/train.py [--steps 20 --warmup 4] [--hidden 512 --layers 4] [--modes ce topk]
     .venv/bin/python benchmarks/train.py --modes ce online onpolicy   # the online teacher's rows
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")  # no Apex/TE/CUDA on CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = ("ce", "topk", "sampled", "online", "onpolicy")
CACHE_MODES = ("topk", "sampled")


# --- data: token shards, a teacher, its caches ----------------------------------------------------------------

def intermediate_size(args: argparse.Namespace) -> int:
    """--intermediate, or 2.75 × hidden rounded up to a multiple of 64 (1408 for 512, as configs/student_kd.yaml)."""
    return args.intermediate or 64 * math.ceil(2.75 * args.hidden / 64)


def make_data(args: argparse.Namespace, base: Path) -> dict:
    """Token shards and the caches the chosen modes need; {name: path} plus the cache summaries."""
    from benchmarks.model import make_checkpoint
    from pipeline.config import CacheConfig, from_dict
    from pipeline.teacher.job import run_cache
    from tests.shardmaker import make_token_shards

    samples = args.steps * args.micro_batch
    per_shard = math.ceil(samples / args.shards)
    make_token_shards(base / "tokens", [per_shard] * args.shards, seq_len=args.seq_len, vocab_size=args.vocab,
                      seed=args.seed)
    out: dict = {"tokens": base / "tokens", "teacher": base / "teacher", "summaries": {}}
    needed = [m for m in args.modes if m in CACHE_MODES]
    if any(m != "ce" for m in args.modes):
        teacher = argparse.Namespace(hidden=args.teacher_hidden, layers=args.teacher_layers, heads=4, kv_heads=2,
                                     intermediate=2 * args.teacher_hidden, vocab=args.vocab, seq_len=args.seq_len,
                                     seed=args.seed)
        make_checkpoint(teacher, base / "teacher", lm_head_std=args.lm_head_std)
    for mode in needed:
        cfg = from_dict(CacheConfig, {"teacher": str(base / "teacher"), "tokens": str(base / "tokens"),
                                      "output": str(base / f"cache_{mode}"), "progress": False,
                                      "micro_batch": args.micro_batch,
                                      "targets": {"mode": mode, "k": args.k, "draws": args.draws}})
        summary = run_cache(cfg)
        if not summary["complete"]:
            raise RuntimeError(f"the {mode} cache job did not complete: {summary}")
        out[mode] = base / f"cache_{mode}"
        out["summaries"][mode] = summary
    return out


# --- training runs ---------------------------------------------------------------------------------------------

def overrides(args: argparse.Namespace, data: dict, mode: str, run_dir: Path) -> list[str]:
    """`distill train` overrides of one configuration; only the loss and the cache differ between modes."""
    out = [f"run_dir={run_dir}", f"data.tokens={data['tokens']}", f"seed={args.seed}",
           f"data.num_workers={args.num_workers}", "data.shuffle=true",
           f"model.vocab_size={args.vocab}", f"model.hidden_size={args.hidden}",
           f"model.intermediate_size={intermediate_size(args)}", f"model.num_layers={args.layers}",
           f"model.num_heads={args.heads}", f"model.num_kv_heads={args.kv_heads}", "model.tie_embeddings=false",
           f"schedule.steps={args.steps}", f"schedule.micro_batch={args.micro_batch}",
           "schedule.grad_accumulation=1", "optim.warmup_steps=2", "checkpoint.every=0", "eval.every=0",
           "log.tensorboard=false", "log.progress=false"]
    if mode == "ce":
        return out + ["loss.divergence=ce"]
    if mode == "online":
        return out + [f"teacher.online={data['teacher']}", "loss.divergence=kl"]
    if mode == "onpolicy":
        return out + [f"teacher.online={data['teacher']}", "loss.divergence=rkl", "loss.prefixes.student=1",
                      f"loss.prefixes.prompt_len={args.prompt_len}",
                      f"loss.prefixes.sampling.max_new_tokens={args.new_tokens}"]
    return out + [f"data.teacher_cache={data[mode]}", "loss.divergence=kl", "loss.target_mode=tail"]


def train_once(args: argparse.Namespace, data: dict, mode: str, run_dir: Path) -> list[dict]:
    """The train rows of metrics.jsonl of one run of `mode`, in a new process (or this one with --in-process)."""
    items = overrides(args, data, mode, run_dir)
    if args.in_process:
        from pipeline.config import TrainConfig, load_config
        from pipeline.train.run import run_training
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        status = run_training(load_config(TrainConfig, None, items))
        if status != 0:
            raise RuntimeError(f"{mode}: run_training returned {status}")
    else:
        log = run_dir.with_suffix(".log")
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, "-m", "pipeline", "train", *items], cwd=ROOT, stdout=f,
                                  stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=False)
        if proc.returncode != 0:
            tail = log.read_text()[-4000:]
            raise RuntimeError(f"{mode}: `python -m pipeline train` exited with {proc.returncode}:\n{tail}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [r for r in rows if r.get("kind") == "train"]


PARTS = {"teacher_s": "perf/teacher_s", "generate_s": "perf/generate_student_s",
         "generated_tokens": "data/generated_student_tokens"}
"""Per-step figures an online run logs besides the step time, by summary key (the median is kept)."""


def summarise(rows: list[dict], warmup: int) -> dict:
    kept = [r for r in rows if r["step"] > warmup]
    if not kept:
        raise RuntimeError(f"no steps after the {warmup} warm-up steps; raise --steps")
    times = [r["perf/step_time_s"] for r in kept]
    waits = [r["perf/data_wait_fraction"] * r["perf/step_time_s"] for r in kept]
    median = statistics.median(times)
    tokens = statistics.median(r["perf/tokens_per_s"] * r["perf/step_time_s"] for r in kept)  # counted per step
    out = {"steps": len(kept), "median_s": median, "min_s": min(times), "tokens_per_s": tokens / median,
           "wait_fraction": sum(waits) / sum(times), "loss_last": kept[-1].get("train/loss", float("nan"))}
    for key, tag in PARTS.items():
        if tag in kept[0]:
            out[key] = statistics.median(r[tag] for r in kept)
    if "generate_s" in out:  # the student's own step: what is left of each step after data, generation, teacher
        out["student_s"] = statistics.median(r["perf/step_time_s"] * (1 - r["perf/data_wait_fraction"])
                                             - r["perf/generate_student_s"] - r["perf/teacher_s"] for r in kept)
    return out


def measure(args: argparse.Namespace, data: dict, base: Path) -> dict:
    """{mode: [summary per round]}."""
    results: dict = {mode: [] for mode in args.modes}
    for round_index in range(args.rounds):
        for mode in args.modes:
            started, load = time.perf_counter(), os.getloadavg()[0]
            rows = train_once(args, data, mode, base / f"run-{mode}-{round_index}")
            results[mode].append(summarise(rows, args.warmup))
            s = results[mode][-1]
            print(f"  round {round_index + 1}/{args.rounds} {mode}: median {s['median_s']:.3f} s/step, fastest "
                  f"{s['min_s']:.3f}, wait {100 * s['wait_fraction']:.1f}%, loss {s['loss_last']:.3f} "
                  f"({time.perf_counter() - started:.0f} s wall, load average {load:.2f} before)", file=sys.stderr)
    return results


def label(args: argparse.Namespace, mode: str) -> str:
    return {"ce": "CE only (hard labels)", "topk": f"KD top-K K={args.k}, forward KL, tail",
            "sampled": f"KD sampled N={args.draws}, forward KL", "online": "KD online teacher, dense forward KL",
            "onpolicy": f"on-policy RKL: student continues {args.prompt_len}-token prompts by ≤ "
                        f"{args.new_tokens}"}[mode]


def print_table(args: argparse.Namespace, results: dict, data: dict) -> None:
    best = {mode: min(rounds, key=lambda s: s["median_s"]) for mode, rounds in results.items()}
    base = best.get("ce")
    print(f"Student Llama hidden={args.hidden} layers={args.layers} heads={args.heads} kv_heads={args.kv_heads} "
          f"intermediate={intermediate_size(args)} vocab={args.vocab}, float32, DeepSpeed ZeRO-3 world of one; "
          f"micro_batch={args.micro_batch} × seq_len={args.seq_len} = {args.micro_batch * args.seq_len} tokens/step, "
          f"grad_accumulation 1, data.num_workers={args.num_workers}; {args.steps} steps, median of the last "
          f"{args.steps - args.warmup} (first {args.warmup} dropped), best of {args.rounds} interleaved rounds, "
          f"{'one process for all runs' if args.in_process else 'a new process per run'}\n")
    for mode, summary in data["summaries"].items():
        print(f"- {mode} cache: {summary['bytes_per_token']:.2f} bytes/token")
    print()
    fastest = {mode: min(r["min_s"] for r in rounds) for mode, rounds in results.items()}
    print("| run | step s (median) | tokens/s | vs CE | data-wait fraction | round spread | fastest step s | "
          "fastest vs CE | target ≤ 1.1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.modes:
        s, rounds = best[mode], results[mode]
        ratio = s["median_s"] / base["median_s"] if base else float("nan")
        verdict = "-" if mode not in CACHE_MODES or base is None else ("met" if ratio <= 1.1 else "NOT met")
        spread = max(r["median_s"] for r in rounds) / s["median_s"]
        quick = fastest[mode] / fastest["ce"] if base else float("nan")
        print(f"| {label(args, mode)} | {s['median_s']:.3f} | {s['tokens_per_s']:,.0f} | "
              f"{'-' if base is None else f'{ratio:.2f}'} | {s['wait_fraction']:.3f} | {spread:.2f} | "
              f"{fastest[mode]:.3f} | {'-' if base is None else f'{quick:.2f}'} | {verdict} |")
    print()
    if "online" in best and base is not None:
        print_online(best["online"], base)
    if "onpolicy" in best:
        print_onpolicy(args, best["onpolicy"])


def print_online(online: dict, ce: dict) -> None:
    """Online dense KD against its floor: a CE step plus the teacher forward the same run measured."""
    floor = ce["median_s"] + online["teacher_s"]
    ratio = online["median_s"] / floor
    print("### Online dense KD against a CE step plus one teacher forward\n")
    print("| run | step s (median) | teacher forward s (perf/teacher_s) | CE step + teacher forward s | ratio | "
          "target ≤ 1.1 |")
    print("|---|---|---|---|---|---|")
    print(f"| KD online teacher, dense forward KL | {online['median_s']:.3f} | {online['teacher_s']:.3f} | "
          f"{floor:.3f} | {ratio:.2f} | {'met' if ratio <= 1.1 else 'NOT met'} |")
    print()


def print_onpolicy(args: argparse.Namespace, onpolicy: dict) -> None:
    """The on-policy step split into the student's generation, the teacher's scoring and the student's step."""
    step = onpolicy["median_s"]
    print(f"### On-policy step, split (every row continued by the student: prompt {args.prompt_len} tokens, "
          f"median {onpolicy['generated_tokens']:.0f} generated tokens per step)\n")
    print("| part | s (median) | share of the step |")
    print("|---|---|---|")
    for name, key in (("generation by the student (perf/generate_student_s)", "generate_s"),
                      ("teacher scoring (perf/teacher_s)", "teacher_s"),
                      ("the student's step (forward, loss, backward, optimizer: the rest)", "student_s")):
        print(f"| {name} | {onpolicy[key]:.3f} | {onpolicy[key] / step:.2f} |")
    print(f"| whole step (perf/step_time_s) | {step:.3f} | 1.00 |")
    print()


# --- breakdown: what the distillation path adds, in this process -----------------------------------------------

def time_interleaved(parts: list, repeats: int) -> list[float]:
    """Fastest seconds of each `fn()` of `parts` [(name, fn)], called in turn `repeats` times after one warm-up
    call each, so a burst of load from another process hits every part alike rather than one."""
    for _, fn in parts:
        fn()
    best = [math.inf] * len(parts)
    for _ in range(repeats):
        for i, (_, fn) in enumerate(parts):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def breakdown(args: argparse.Namespace, data: dict) -> None:
    from pipeline.data.dataset import Source, TokenShardDataset
    from pipeline.losses import distill_loss
    from pipeline.teacher.reader import CacheTargets
    from pipeline.train.stream import TEACHER

    padded = 128 * math.ceil(args.vocab / 128)  # compute.vocab_multiple = 128 at tp = 1
    shape = (args.micro_batch, args.seq_len, padded)
    generator = torch.Generator().manual_seed(args.seed)
    logits = torch.randn(shape, generator=generator)
    labels = torch.randint(0, args.vocab, shape[:2], generator=generator)

    def loss_step(targets):
        leaf = logits.clone().requires_grad_(True)
        out = distill_loss(leaf, targets, labels=labels, divergence="ce" if targets is None else "kl",
                           vocab_size=args.vocab)
        out.loss.backward()

    parts = [("CE loss fwd+bwd (hard labels)", lambda: loss_step(None))]
    for mode in [m for m in args.modes if m in CACHE_MODES]:
        source = Source(str(data["tokens"]), sidecars={TEACHER: str(data[mode])})
        dataset = TokenShardDataset(source, micro_batch=args.micro_batch, dp_rank=0, dp_size=1, seed=args.seed,
                                    shuffle=False)
        batch = next(iter(dataset))
        reader = CacheTargets(str(data[mode]), prefix=TEACHER, sparse_mode="tail")
        targets = reader.targets(batch)
        width = f", W={targets.ids.shape[-1]} distinct ids" if mode == "sampled" else f", K={args.k}"
        parts.append((f"{mode}: decode one micro-batch (CacheTargets.targets)",
                      lambda reader=reader, batch=batch: reader.targets(batch)))
        parts.append((f"{mode}: KD loss fwd+bwd (forward KL{width})", lambda targets=targets: loss_step(targets)))
    rows = list(zip([name for name, _ in parts], time_interleaved(parts, args.breakdown_repeats)))
    print(f"### Breakdown: the distillation path's parts, one micro-batch [{args.micro_batch}, {args.seq_len}, "
          f"{padded}] fp32 logits, {torch.get_num_threads()} torch threads, fastest of {args.breakdown_repeats} "
          f"interleaved calls after 1\n")
    print("| part | ms | ms / CE loss |")
    print("|---|---|---|")
    ce = rows[0][1]
    for name, seconds in rows:
        print(f"| {name} | {1000 * seconds:.1f} | {seconds / ce:.2f} |")
    print()


# --- main ------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="configurations to train (ce is the baseline of the ratio)")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the figures")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times the set of runs repeats, interleaved; each row keeps its fastest round")
    parser.add_argument("--in-process", action="store_true",
                        help="run every configuration in this process, one after another (default: a new "
                             "`python -m pipeline train` process per run)")
    student = parser.add_argument_group("student")
    student.add_argument("--vocab", type=int, default=32000, help="vocabulary of student, teacher and shards")
    student.add_argument("--hidden", type=int, default=512, help="student hidden size")
    student.add_argument("--intermediate", type=int, default=None, help="MLP width (default 2.75 × hidden, /64)")
    student.add_argument("--layers", type=int, default=4, help="student decoder layers")
    student.add_argument("--heads", type=int, default=8, help="student attention heads")
    student.add_argument("--kv-heads", type=int, default=4, help="student key/value heads")
    student.add_argument("--seq-len", type=int, default=256, help="tokens per sample")
    student.add_argument("--micro-batch", type=int, default=4, help="samples per step")
    student.add_argument("--num-workers", type=int, default=1, help="data.num_workers (reader processes)")
    student.add_argument("--prompt-len", type=int, default=32, help="onpolicy: prompt tokens of each row")
    student.add_argument("--new-tokens", type=int, default=64, help="onpolicy: most tokens the student generates")
    teacher = parser.add_argument_group("teacher (its caches, and the online teacher)")
    teacher.add_argument("--k", type=int, default=32, help="top-K of the topk cache")
    teacher.add_argument("--draws", type=int, default=50, help="N draws of the sampled cache")
    teacher.add_argument("--shards", type=int, default=4, help="token shards (samples: steps × micro-batch)")
    teacher.add_argument("--teacher-hidden", type=int, default=128, help="teacher hidden size")
    teacher.add_argument("--teacher-layers", type=int, default=2, help="teacher decoder layers")
    teacher.add_argument("--lm-head-std", type=float, default=0.5,
                         help="std of the teacher's output layer (peaked distributions, as a trained model's)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time target decode and the KD/CE loss on one micro-batch in this process")
    parser.add_argument("--breakdown-repeats", type=int, default=5, help="timed calls per breakdown part")
    parser.add_argument("--seed", type=int, default=0, help="seed of tokens, teacher and student")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from importlib.metadata import version

    import transformers
    from benchmarks.generate import cpu_model
    transformers.utils.logging.disable_progress_bar()
    print(f"{cpu_model()}; torch {torch.__version__}, deepspeed {version('deepspeed')}, transformers "
          f"{transformers.__version__}; "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start\n")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        base = Path(tmp)
        started = time.perf_counter()
        data = make_data(args, base)
        print(f"  data and caches made in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        print_table(args, measure(args, data, base), data)
        if args.breakdown:
            breakdown(args, data)


if __name__ == "__main__":
    main()

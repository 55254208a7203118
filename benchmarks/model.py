"""Forward tokens/s of our tensor-parallel Llama against transformers' LlamaForCausalLM, same run, CPU.

Ours is pipeline.model's megatron-core LlamaGPT; the baseline is transformers' model with the same
config and weights.

Builds a random `transformers.LlamaForCausalLM` (default: hidden 512, 8 layers, 8 heads, 4 KV heads,
intermediate 1408, vocabulary 32000, untied embeddings, float32), saves it with `save_pretrained` to a
temporary folder, then times one forward of the same `[batch, seq_len]` random tokens, under
`torch.no_grad()` in eval mode:
- **transformers**: `LlamaForCausalLM.from_pretrained(folder)` (sdpa attention) in this process, with
  all of this process's torch threads;
- **ours**: `pipeline.model.load_hf(folder, ctx)` in freshly spawned gloo processes, at each `--tp`
  (one process per TP rank, each with `cores // tp` torch threads), the logits staying split over the
  vocabulary as the trainer uses them (no gather inside the timed region).
Time is the median wall time per forward over `--repeats` calls after `--warmup` calls (at TP > 1
the slowest rank's median, each call starting after a barrier); tokens/s = batch × seq_len / median.
The whole set (transformers, then each TP size in new processes) runs `--rounds` times, interleaved,
and each row reports its fastest round, so a burst of load from another process on a shared machine
hits one round rather than one implementation; the spread column gives slowest/fastest round.
The sanity column is the largest |our logit − transformers' logit| over every position and token,
our TP shards gathered with all_gather over the TP group outside the timed region.

Trade-offs: random weights (speed does not depend on them; the sanity column only shows the two
compute the same function), one small config, CPU only; TP > 1 on a machine with fewer cores than
ranks × threads makes the ranks compete for the same cores, so there it checks correctness, not
speed. Process start, imports and checkpoint loading are not timed.
Run: .venv/bin/python benchmarks/model.py [--tp 1 2] [--batch 4] [--seq-len 256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import io
import os
import queue
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")  # no Apex/TE/CUDA on CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# --- the checkpoint and the baseline ------------------------------------------------------------------------

def make_checkpoint(args: argparse.Namespace, folder: Path, *, lm_head_std: float | None = None) -> None:
    """A random LlamaForCausalLM of the benchmark's config, saved as a Hugging Face folder; with
    `lm_head_std`, its output layer is redrawn with that std so the logits are peaked like a trained one's."""
    import transformers
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq_len), rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    if lm_head_std is not None:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, lm_head_std)
    model.save_pretrained(folder)


def make_tokens(args: argparse.Namespace) -> torch.Tensor:
    return torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(7))


def time_forward(forward, tokens: torch.Tensor, warmup: int, repeats: int, barrier=None) -> float:
    """Median seconds per `forward(tokens)` over `repeats` calls after `warmup` calls."""
    times = []
    for i in range(warmup + repeats):
        if barrier is not None:
            barrier()
        start = time.perf_counter()
        forward(tokens)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def run_transformers(folder: Path, tokens: torch.Tensor, args: argparse.Namespace) -> tuple[float, torch.Tensor]:
    """(median seconds per forward, logits [B, S, V]) of transformers' own model in this process."""
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    with torch.no_grad():
        seconds = time_forward(lambda t: model(input_ids=t, use_cache=False).logits, tokens, args.warmup, args.repeats)
        logits = model(input_ids=tokens, use_cache=False).logits.float()
    return seconds, logits


# --- ours, in spawned gloo processes -------------------------------------------------------------------------

def ours_worker(rank: int, world: int, folder: str, tokens: torch.Tensor, reference_path: str,
                warmup: int, repeats: int, threads: int) -> tuple[float, float]:
    """(median seconds per forward on this rank, max |Δlogit| vs transformers on rank 0 else nan)."""
    import torch.distributed as dist

    from pipeline.model import load_hf
    from pipeline.parallel import ParallelContext
    torch.set_num_threads(threads)
    ctx = ParallelContext.from_env(tp=world, backend="gloo")
    try:
        model = load_hf(folder, ctx)
        model.eval()
        with torch.no_grad():
            seconds = time_forward(model, tokens, warmup, repeats, barrier=dist.barrier)
            local = model(tokens).float().contiguous()
            if world > 1:
                pieces = [torch.empty_like(local) for _ in range(world)]
                dist.all_gather(pieces, local, group=ctx.tp_group)
                local = torch.cat(pieces, dim=-1)
        diff = float("nan")
        if rank == 0:
            reference = torch.load(reference_path)
            diff = (local[..., :reference.shape[-1]] - reference).abs().max().item()
        return seconds, diff
    finally:
        ctx.destroy()


def _entry(rank: int, world: int, port: int, args: tuple, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        buffer = io.BytesIO()
        torch.save(ours_worker(rank, world, *args), buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ours(world: int, args: tuple, timeout_s: float = 1200) -> list:
    """Each rank's `ours_worker` result, from `world` spawned processes; raises with every rank's traceback."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, args, results)) for r in range(world)]
    for proc in procs:
        proc.start()
    outcomes = {}
    while len(outcomes) < world:
        try:
            rank, status, payload = results.get(timeout=timeout_s)
        except queue.Empty:
            break
        outcomes[rank] = (status, payload)
        if status == "error":
            timeout_s = 10  # the others are likely stuck in a collective
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    failures = [f"--- rank {r}:\n{p}" for r, (s, p) in sorted(outcomes.items()) if s == "error"]
    failures += [f"--- rank {r}: no result" for r in range(world) if r not in outcomes]
    if failures:
        raise RuntimeError(f"tp={world} run failed:\n" + "\n".join(failures))
    return [torch.load(io.BytesIO(outcomes[r][1])) for r in range(world)]


# --- main ------------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2],
                        help="tensor-parallel sizes to time ours at (one spawned gloo process per rank)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per implementation (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards before the timed ones")
    parser.add_argument("--rounds", type=int, default=2,
                        help="times the whole set is repeated, interleaved; each row keeps its fastest round")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA); must divide by every --tp")
    parser.add_argument("--intermediate", type=int, default=1408, help="MLP intermediate size")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (ours pads it per TP size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="cores to share out: transformers gets all of them, each TP rank cores // tp")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, tokens: torch.Tensor) -> tuple[dict, dict]:
    """(seconds per forward by implementation, one entry per round; max |Δlogit| by tp)."""
    seconds: dict = {"hf": []}
    diffs: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        folder = Path(tmp) / "llama"
        make_checkpoint(args, folder)
        reference_path = str(Path(tmp) / "reference.pt")
        for round_index in range(args.rounds):
            hf_time, reference = run_transformers(folder, tokens, args)
            seconds["hf"].append(hf_time)
            if round_index == 0:
                torch.save(reference, reference_path)
            del reference
            for tp in args.tp:
                threads = max(1, args.cores // tp)
                results = run_ours(tp, (str(folder), tokens, reference_path, args.warmup, args.repeats, threads))
                seconds.setdefault(tp, []).append(max(r[0] for r in results))
                diffs[tp] = max(diffs.get(tp, 0.0), results[0][1])
    return seconds, diffs


def print_report(args: argparse.Namespace, seconds: dict, diffs: dict, load_before: float) -> None:
    import megatron.core
    import transformers

    n_tokens = args.batch * args.seq_len
    hf_seconds = min(seconds["hf"])
    rows = [("transformers LlamaForCausalLM", "-", args.cores, seconds["hf"], None)]
    rows += [("ours (megatron-core LlamaGPT)", tp, max(1, args.cores // tp), seconds[tp], diffs[tp]) for tp in args.tp]
    print(f"Llama hidden={args.hidden} layers={args.layers} heads={args.heads} kv_heads={args.kv_heads} "
          f"intermediate={args.intermediate} vocab={args.vocab}, float32, batch={args.batch} seq_len={args.seq_len} "
          f"({n_tokens} tokens/forward), median of {args.repeats} after {args.warmup} warm-up, best of {args.rounds} "
          f"rounds, {args.cores} cores (load average {load_before:.2f} at start), "
          f"torch {torch.__version__}, transformers {transformers.__version__}, megatron-core {megatron.core.__version__}")
    print()
    print("| implementation | tp | threads/rank | tokens/s | vs transformers | max |Δlogit| | round spread |")
    print("|---|---|---|---|---|---|---|")
    for name, tp, threads, times, diff in rows:
        best = min(times)
        print(f"| {name} | {tp} | {threads} | {n_tokens / best:,.0f} | {hf_seconds / best:.2f} | "
              f"{'-' if diff is None else f'{diff:.2e}'} | {max(times) / best:.2f} |")
    print()
    oversubscribed = [tp for tp in args.tp if tp > 1 and tp * max(1, args.cores // tp) > (os.cpu_count() or 1) or
                      tp > args.cores]
    if any(tp > 1 for tp in args.tp):
        print(f"Note: this machine has {os.cpu_count()} cores; TP > 1 splits them between ranks "
              f"(cores // tp threads each) and adds gloo all-reduces over local sockets, so on CPU the TP > 1 rows "
              f"are about correctness (the max |Δlogit| column), not speed."
              + (f" TP={oversubscribed} oversubscribes the cores." if oversubscribed else ""))


def main(argv=None) -> None:
    args = parse_args(argv)
    import transformers
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.cores)
    tokens = make_tokens(args)
    load_before = os.getloadavg()[0]
    seconds, diffs = measure(args, tokens)
    print_report(args, seconds, diffs, load_before)


if __name__ == "__main__":
    main()

"""Forward+backward time and peak extra memory of distill_loss against two baselines, same run.

Baselines, on the same logits: the naive way (gather every vocabulary shard, log_softmax, compute
the divergence with autograd) and megatron-core's vocab_parallel_cross_entropy. Each configuration
runs in fresh processes (tp of them, gloo) so peak memory is not inherited; peak extra memory is the
rise of the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) above the
level after the inputs exist, as a multiple of this rank's logits, from the first run in each
process. Times are the median of --repeats runs after that first one.

The fused section times distill_linear_loss (hidden [N, H] and this rank's weight slice [Vl, H] in,
gradients for both out) against the unfused path on the same inputs (logits = hidden @ weightᵀ, then
distill_loss, backward through the matmul), with the gradients computed in forward (`fused`) or
recomputed in backward (`fused_recompute`); peak extra memory is above the inputs (hidden, weight,
targets) and is given as a multiple of this rank's fp32 logits [N, Vl], which the fused path never
allocates. For hard labels (divergence ce) it adds torch.nn.functional.linear_cross_entropy with its
chunked options at tp = 1 (it is not vocabulary-parallel), where this torch has it.
Run: .venv/bin/python benchmarks/loss.py [--tokens 8192] [--sections unfused fused] [--hidden 1024] [--divergence kl]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.losses.divergences import DIVERGENCES  # noqa: E402
from tests.harness import run_distributed  # noqa: E402

MEMORY_BUDGET = 20 * 2**30


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_inputs(tokens, vocab, tp, tp_rank, kind, dtype=torch.float32, k=32):
    gen = torch.Generator().manual_seed(1234 + tp_rank)
    local = vocab // tp
    student = (torch.randn(tokens, local, generator=gen) * 2).to(dtype)
    inputs = {"student": student}
    if kind == "dense":
        inputs["teacher"] = (torch.randn(tokens, local, generator=gen) * 2).to(dtype)
    else:
        ids_gen = torch.Generator().manual_seed(99)  # identical on every rank
        ids = torch.rand(tokens, vocab, generator=ids_gen).topk(k, dim=-1).indices
        logp = torch.log(torch.full((tokens, k), 0.9 / k))
        inputs.update(ids=ids, logp=logp, log_rest=torch.full((tokens,), torch.log(torch.tensor(0.1)).item()))
    inputs["labels"] = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(7))
    return inputs


def ours(inputs, group, kind, divergence="kl"):
    from pipeline.losses import DenseTargets, SparseTargets, distill_loss
    targets = DenseTargets(inputs["teacher"]) if kind == "dense" else \
        SparseTargets(inputs["ids"], inputs["logp"], inputs["log_rest"])
    x = inputs["student"].requires_grad_()
    distill_loss(x, targets, divergence=divergence, tp_group=group).loss.backward()
    return x


def naive(inputs, group, kind, divergence="kl"):  # forward KL only
    from torch.distributed.nn.functional import all_gather
    x = inputs["student"].requires_grad_()
    full = torch.cat(all_gather(x, group=group), dim=-1) if group is not None else x
    log_q = full.log_softmax(-1)
    if kind == "dense":
        t = inputs["teacher"]
        t_full = torch.cat(all_gather(t, group=group), dim=-1) if group is not None else t
        log_p = t_full.log_softmax(-1)
        loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    else:
        ids, logp = inputs["ids"], inputs["logp"]
        q_rest = log_q.scatter(1, ids, float("-inf")).logsumexp(-1)
        p_rest = inputs["log_rest"]
        loss = ((logp.exp() * (logp - log_q.gather(1, ids))).sum(-1) + p_rest.exp() * (p_rest - q_rest)).mean()
    loss.backward()
    return x


def megatron_ce(inputs, group, kind, divergence=None):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    x = inputs["student"].requires_grad_()
    vocab_parallel_cross_entropy(x, inputs["labels"]).mean().backward()
    return x


def make_linear_inputs(tokens, vocab, hidden, tp, tp_rank, kind, dtype=torch.float32, k=32):
    """Hidden states (the same on every rank), this rank's weight slice, and the targets of `kind`."""
    gen = torch.Generator().manual_seed(4321)
    local = vocab // tp
    inputs = {"hidden": torch.randn(tokens, hidden, generator=gen).to(dtype),
              "weight": (torch.randn(local, hidden, generator=torch.Generator().manual_seed(77 + tp_rank))
                         * (2 / hidden**0.5)).to(dtype)}
    targets = make_inputs(tokens, vocab, tp, tp_rank, "sparse" if kind == "labels" else kind, dtype, k)
    del targets["student"]
    inputs.update(targets)
    return inputs


def _linear_call(inputs, group, kind, fn, divergence):
    from pipeline.losses import DenseTargets, SparseTargets
    h, w = inputs["hidden"].requires_grad_(), inputs["weight"].requires_grad_()
    if kind == "labels":
        out = fn(h, w, None, divergence="ce", labels=inputs["labels"], tp_group=group)
    else:
        targets = DenseTargets(inputs["teacher"]) if kind == "dense" else \
            SparseTargets(inputs["ids"], inputs["logp"], inputs["log_rest"])
        out = fn(h, w, targets, divergence=divergence, tp_group=group)
    out.loss.backward()
    return h


def unfused(inputs, group, kind, divergence="kl"):
    from pipeline.losses import distill_loss
    return _linear_call(inputs, group, kind, lambda h, w, t, **kw: distill_loss(h @ w.T, t, **kw), divergence)


def fused(inputs, group, kind, divergence="kl", recompute=False):
    from pipeline.losses import distill_linear_loss
    return _linear_call(inputs, group, kind, lambda h, w, t, **kw: distill_linear_loss(h, w, t, recompute=recompute,
                                                                                       **kw), divergence)


def fused_recompute(inputs, group, kind, divergence="kl"):
    return fused(inputs, group, kind, divergence, recompute=True)


def torch_lce(inputs, group, kind, divergence=None):
    import torch.nn.functional as F
    h, w = inputs["hidden"].requires_grad_(), inputs["weight"].requires_grad_()
    F.linear_cross_entropy(h, w, inputs["labels"], options=torch.nn.LinearCrossEntropyOptions()).backward()
    return h


FORMULA_ENV = "DISTILL_BENCH_FORMULA_ELEMENTS"
"""How --formula-elements reaches the worker processes."""

METHODS = {"ours": ours, "naive": naive, "megatron_ce": megatron_ce, "unfused": unfused, "fused": fused,
           "fused_recompute": fused_recompute, "torch_lce": torch_lce}
LINEAR_METHODS = ("unfused", "fused", "fused_recompute", "torch_lce")


def has_torch_lce() -> bool:
    return hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def worker(rank, world, tokens, vocab, kind, method, repeats, dtype, hidden=0, divergence="kl"):
    """Peak memory from the first run (a fresh process: nothing freed yet to blur the base), then
    the median time of `repeats` further runs."""
    import megatron.core.tensor_parallel  # noqa: F401 - imported before measuring, not during
    import pipeline.losses  # noqa: F401
    from pipeline.parallel import ParallelContext
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if FORMULA_ENV in os.environ:  # --formula-elements, set by main for every worker it starts
        import pipeline.losses.dense as dense
        dense.CPU_FORMULA_ELEMENTS = int(os.environ[FORMULA_ENV])
    ctx = ParallelContext.from_env(tp=world)
    group = ctx.tp_group if world > 1 else None
    times, peak, workspace = [], 0.0, 0.0
    for i in range(repeats + 1):
        if method in LINEAR_METHODS:
            inputs = make_linear_inputs(tokens, vocab, hidden, world, rank, kind, dtype)
            logits_bytes = tokens * (vocab // world) * 4
        else:
            inputs = make_inputs(tokens, vocab, world, rank, kind, dtype)
            logits_bytes = inputs["student"].numel() * inputs["student"].element_size()
        base = rss_bytes()
        reset_peak()
        dist.barrier()
        start = time.perf_counter()
        METHODS[method](inputs, group, kind, divergence)
        elapsed = time.perf_counter() - start
        if i == 0:
            peak = (peak_rss_bytes() - base) / logits_bytes
            grads = sum(t.grad.numel() * t.grad.element_size() for t in inputs.values()
                        if isinstance(t, torch.Tensor) and t.grad is not None)
            workspace = peak - grads / logits_bytes
        else:
            times.append(elapsed)
        del inputs
    ctx.destroy()
    return statistics.median(times), peak, workspace


def naive_fits(tokens, vocab, kind, tp) -> bool:
    full = tokens * vocab * 4
    per_rank = full * (8 if kind == "dense" else 5) + full // tp * 3
    return per_rank * tp < MEMORY_BUDGET


def measure(tokens, vocab, tp, kind, method, repeats, dtype, hidden=0, divergence="kl"):
    if method == "naive" and (divergence != "kl" or not naive_fits(tokens, vocab, kind, tp)):
        return None
    results = run_distributed(worker, tp, tokens, vocab, kind, method, repeats, dtype, hidden, divergence,
                              timeout_s=1800)
    return tuple(max(r[i] for r in results) for i in range(3))


def unfused_section(args, dtype) -> None:
    print("| V | tp | targets | method | fwd+bwd s | time / megatron CE | peak extra / logits |")
    print("|---|---|---|---|---|---|---|")
    for vocab in args.vocab:
        for tp in args.tp:
            ce_time, ce_mem, _ = measure(args.tokens, vocab, tp, "sparse", "megatron_ce", args.repeats, dtype)
            print(f"| {vocab} | {tp} | hard labels | megatron_ce | {ce_time:.3f} | 1.00 | {ce_mem:.2f} |", flush=True)
            for kind in [k for k in args.targets if k != "labels"]:
                for method in args.methods:
                    got = measure(args.tokens, vocab, tp, kind, method, args.repeats, dtype, divergence=args.divergence)
                    label = f"{kind} K=32" if kind == "sparse" else kind
                    if got is None:
                        why = "forward KL only" if args.divergence != "kl" else f"over {MEMORY_BUDGET >> 30} GiB"
                        print(f"| {vocab} | {tp} | {label} | {method} | skipped: {why} | | |")
                    else:
                        print(f"| {vocab} | {tp} | {label} | {method} | {got[0]:.3f} | {got[0] / ce_time:.2f} "
                              f"| {got[1]:.2f} |", flush=True)


def fused_section(args, dtype) -> None:
    print(f"\nFused output layer: H={args.hidden}; time and memory against the unfused path (logits = hidden @ Wᵀ, "
          "then distill_loss) on the same inputs; hard labels also against torch's linear_cross_entropy (tp 1)")
    if not has_torch_lce():
        print(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy: those rows are skipped")
    print("workspace: the peak extra less the gradients of hidden and weight, which every method returns")
    print("| V | tp | targets | method | fwd+bwd s | time / unfused | peak extra / logits | workspace / logits "
          "| time / torch LCE | memory / torch LCE |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    div = args.divergence
    for vocab in args.vocab:
        for tp in args.tp:
            for kind in args.targets:
                label = {"sparse": "sparse K=32", "dense": "dense", "labels": "hard labels (ce)"}[kind]
                base = measure(args.tokens, vocab, tp, kind, "unfused", args.repeats, dtype, args.hidden, div)
                lce = None
                if kind == "labels" and tp == 1 and has_torch_lce():
                    lce = measure(args.tokens, vocab, tp, kind, "torch_lce", args.repeats, dtype, args.hidden)
                    print(f"| {vocab} | {tp} | {label} | torch_lce | {lce[0]:.3f} | {lce[0] / base[0]:.2f} "
                          f"| {lce[1]:.2f} | {lce[2]:.2f} | 1.00 | 1.00 |", flush=True)
                print(f"| {vocab} | {tp} | {label} | unfused | {base[0]:.3f} | 1.00 | {base[1]:.2f} | {base[2]:.2f} "
                      "| | |", flush=True)
                for method in args.fused_methods:
                    got = measure(args.tokens, vocab, tp, kind, method, args.repeats, dtype, args.hidden, div)
                    vs_lce = f"{got[0] / lce[0]:.2f} | {got[1] / max(lce[1], 1e-9):.2f}" if lce else " | "
                    print(f"| {vocab} | {tp} | {label} | {method} | {got[0]:.3f} | {got[0] / base[0]:.2f} "
                          f"| {got[1]:.2f} | {got[2]:.2f} | {vs_lce} |", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the logits' dtype")
    parser.add_argument("--methods", nargs="+", choices=["ours", "naive"], default=["ours", "naive"])
    parser.add_argument("--targets", nargs="+", choices=["sparse", "dense", "labels"],
                        default=["sparse", "dense", "labels"],
                        help="teacher targets: sparse top-32, dense logits, or hard labels (divergence ce; fused only)")
    parser.add_argument("--divergence", default="kl", choices=sorted(set(DIVERGENCES) - {"ce"}),
                        help="the divergence for sparse and dense targets (naive rows are forward KL only)")
    parser.add_argument("--sections", nargs="+", choices=["unfused", "fused"], default=["unfused", "fused"],
                        help="unfused: distill_loss on logits vs megatron CE and naive; fused: distill_linear_loss")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size H of the fused section")
    parser.add_argument("--fused-methods", nargs="+", choices=["fused", "fused_recompute"],
                        default=["fused", "fused_recompute"],
                        help="fused: gradients computed in forward (the default); fused_recompute: in backward")
    parser.add_argument("--formula-elements", type=int, default=None, metavar="N",
                        help="numbers per row block of the dense per-outcome formulas (rkl, js, tvd, skew KLs) "
                             "instead of pipeline/losses/dense.py's CPU_FORMULA_ELEMENTS, to compare block sizes")
    args = parser.parse_args(argv)
    if args.formula_elements is not None:
        if args.formula_elements < 1:
            parser.error(f"--formula-elements: expected an int >= 1, got {args.formula_elements}")
        os.environ[FORMULA_ENV] = str(args.formula_elements)
    dtype = getattr(torch, args.dtype)
    blocks = f", formula row blocks of {args.formula_elements} numbers" if args.formula_elements else ""
    print(f"N={args.tokens} tokens, {args.dtype} inputs, divergence {args.divergence}{blocks}, {cpu_model()}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    if "unfused" in args.sections:
        unfused_section(args, dtype)
    if "fused" in args.sections:
        fused_section(args, dtype)


if __name__ == "__main__":
    main()

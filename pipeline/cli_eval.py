"""The `distill eval` subcommand: f-DISTILL's likelihood and coverage risks of any student/teacher pair.

It runs in this process, as one rank of whatever launched it: plain (a world of one) or `torchrun`
(world = dp × tp; `--tp` ranks hold one copy of each model, the dp copies split the prompts and their
sums are all-reduced). Models are Hugging Face folders, TP checkpoints, or a training run (its latest
checkpoint, a checkpoints folder or a tag folder), which is exported to a temporary Hugging Face
folder first (`pipeline/train/export.py`), by every process for itself: simple, at the cost of one
consolidation per process. Heavy imports stay inside the handler, so `--help` answers at once.
"""
from __future__ import annotations

import argparse
import json

EVAL_HELP = """\
Measure f-DISTILL's risks (Table 3) of a student against a teacher on held-out prompts (the first
--prompt-len tokens of the first --prompts samples of --tokens):

  R_llh  likelihood risk: mean −log p_teacher over the student's sampled continuations
         (high = the student averages modes: it says things the teacher would not)
  R_cvg  coverage risk: mean −log q_student over the teacher's sampled continuations
         (high = the student collapses modes: it misses things the teacher says)

Pooled over every generated token (EOS included), natural log. Both models sample with the same
settings (default: f-DISTILL's top-k 30 at temperature 1), seeded by --seed and each sample's key,
so a rerun, another --tp or another process count gives the same figures. Student and teacher must
share the vocabulary.

  distill eval --student runs/kd --teacher work/teacher_hf --tokens work/shards/heldout --output risks.json
  torchrun --nproc-per-node 2 -m pipeline eval --tp 2 --student S --teacher T --tokens D
"""


def add_eval_command(commands) -> None:
    """Register `eval` on the `distill` subparsers."""
    from pipeline.config import RiskSamplingConfig

    defaults = RiskSamplingConfig()
    parser = commands.add_parser("eval", help="the likelihood and coverage risks of a student against a teacher",
                                 description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, metavar="PATH",
                        help="Hugging Face folder, TP checkpoint, or a training run / checkpoint folder")
    parser.add_argument("--teacher", required=True, metavar="PATH", help="same kinds as --student")
    parser.add_argument("--tokens", required=True, metavar="DIR", help="held-out token shards the prompts come from")
    parser.add_argument("--prompts", type=int, default=32, metavar="N",
                        help="prompts in total, from the first N samples (default 32)")
    parser.add_argument("--prompt-len", type=int, default=16, metavar="L", help="tokens per prompt (default 16)")
    parser.add_argument("--mode", choices=("sample", "greedy"), default=defaults.mode,
                        help=f"how both models pick tokens (default {defaults.mode})")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, metavar="T",
                        help=f"sampling temperature (default {defaults.temperature:g})")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, metavar="K",
                        help=f"sample among the K most likely ids, 0 = all (default {defaults.top_k}, as f-DISTILL)")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, metavar="P",
                        help=f"nucleus sampling mass, 1 = off (default {defaults.top_p:g})")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, metavar="N",
                        help=f"most tokens generated per prompt (default {defaults.max_new_tokens})")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the draws (default 0)")
    parser.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel size (default 1)")
    parser.add_argument("--vocab-multiple", type=int, default=128, metavar="M",
                        help="vocabulary padding multiple; a TP checkpoint must have been split with it (default 128)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype (default auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--output", metavar="FILE.json", help="also write the figures and settings as JSON")
    parser.set_defaults(handler=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    from pipeline.config import RiskSamplingConfig, from_dict

    # the sampling flags checked as the config section they mirror (eval.sampling of a training run)
    sampling = from_dict(RiskSamplingConfig, {"mode": args.mode, "temperature": args.temperature, "top_k": args.top_k,
                                              "top_p": args.top_p, "max_new_tokens": args.max_new_tokens},
                         key="sampling")
    from pipeline.eval.runner import evaluate_pair

    result = evaluate_pair(student=args.student, teacher=args.teacher, tokens=args.tokens, prompts=args.prompts,
                           prompt_len=args.prompt_len, sampling=sampling, seed=args.seed, tp=args.tp,
                           vocab_multiple=args.vocab_multiple, dtype=args.dtype)
    if result is None:  # not the first rank
        return 0
    print(f"R_llh {result['r_llh']:.4f}  (−log p_teacher over {result['llh_tokens']} student tokens)")
    print(f"R_cvg {result['r_cvg']:.4f}  (−log q_student over {result['cvg_tokens']} teacher tokens)")
    print("sampling: " + ", ".join(f"{k}={v}" for k, v in result["sampling"].items()))
    if args.output:
        from tokenization.format import write_atomic

        write_atomic(args.output, (json.dumps(result, indent=2) + "\n").encode())
        print(f"wrote {args.output}")
    return 0

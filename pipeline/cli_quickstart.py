"""The `distill quickstart` subcommand: the whole pipeline on the shipped corpus, one command, on CPU.

Its settings are a QuickstartConfig (pipeline/quickstart/settings.py): a YAML file, overrides, and
`--smoke` for the one-minute scale-down that the tests run. Heavy imports stay inside the handler.
"""
from __future__ import annotations

import argparse
import shlex

QUICKSTART_HELP = """\
Run the whole pipeline on the Austen novels shipped in data/austen, on this machine's CPU:
train a BPE tokenizer, write token shards (train and held-out), pretrain a teacher on labels,
cache its top-K (with exact rest mass) and sampled targets, and its top-K along its own
continuations of one novel's prompts, then train the same student once per loss for the same budget
(CE baseline, KL, RKL, JS, TVD, KL to sampled targets, KL from the teacher pruned to the student's
size, KL along the teacher's samples), evaluating
each on the held-out novel. About 12 minutes on 2 cores; --smoke does the same in about a minute
with tiny models (a check that everything works, not a result).

Writes into --out: results.md and results.csv (held-out perplexity, KL to the teacher, top-1
agreement, f-DISTILL's likelihood and coverage risks, tokens/s), loss_curves.png, runs/*/tensorboard, student_hf/ (the best distilled student
as a Hugging Face folder), and configs/, commands.sh and logs/ with every stage's command. Running
the same command again finishes an interrupted quickstart; another config needs another --out.

  distill quickstart                         # runs/quickstart
  distill quickstart --smoke --out runs/smoke
  distill quickstart student_run.steps=400 divergences=[kl,js] --out runs/qs400

--recipe fdistill trains f-DISTILL's sequence-level students instead, with the teacher online beside each
(no caches): KL along the teacher's own samples, RKL along the student's (on-policy), JS and TVD along half
of each, after a short word-level KL phase, against the CE baseline; the same table, with the likelihood
risk (R_llh, low for RKL) and the coverage risk (R_cvg, low for KL). Writes into runs/quickstart_fdistill.

  distill quickstart --recipe fdistill
"""


def add_quickstart_command(commands) -> None:
    """Register `quickstart` on the `distill` subparsers."""
    quickstart = commands.add_parser("quickstart", help="the whole pipeline on the shipped corpus, compared by loss",
                                     description=QUICKSTART_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    quickstart.add_argument("--config", metavar="PATH", help="YAML QuickstartConfig (default: the built-in one, "
                                                             "as in configs/quickstart.yaml)")
    quickstart.add_argument("--out", metavar="DIR", default=None,
                            help="run folder (default: runs/quickstart, or runs/quickstart_smoke with --smoke)")
    quickstart.add_argument("--recipe", choices=("compare", "fdistill"), default=None,
                            help="compare (default): one student per loss from the teacher's caches; fdistill: "
                                 "f-DISTILL's students with an online teacher (sets recipe=...)")
    quickstart.add_argument("--smoke", action="store_true",
                            help="tiny models and a few steps: about a minute, to check the pipeline end to end")
    quickstart.add_argument("overrides", nargs="*", metavar="section.key=value",
                            help="override a setting (YAML value); see distill config --kind quickstart --reference")
    quickstart.set_defaults(handler=run_quickstart_command)


def run_quickstart_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.quickstart import QuickstartConfig, StageFailed, run_quickstart
    from pipeline.quickstart.settings import SMOKE

    recipe = [f"recipe={args.recipe}"] if args.recipe else []
    cfg = load_config(QuickstartConfig, args.config, (SMOKE if args.smoke else []) + recipe + list(args.overrides))
    default = "runs/quickstart" + ("_fdistill" if cfg.recipe == "fdistill" else "") + ("_smoke" if args.smoke else "")
    out = Path(args.out or default)
    try:
        run_quickstart(cfg, out, shlex.join(["distill", *args.argv]))
    except StageFailed as failure:
        print(f"distill quickstart: {failure}")
        return failure.status if failure.status not in (0, 75) else 1
    return 0

"""Entry point of the teacher-cache job for `torchrun`, `srun` or plain `python`: one process per rank.

    torchrun --nproc-per-node 4 launchers/cache_teacher.py --config configs/cache_topk.yaml parallel.tp=2

Parse → validate → build → run → close, all in `pipeline.cli` (`distill cache`), so the script and the
console command behave the same: same arguments, same errors (exit 2 for bad input), same summary.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["cache", *sys.argv[1:]]))

"""Entry point of the student trainer for `torchrun`, the `deepspeed` launcher, `srun` or plain `python`.

    torchrun --nproc-per-node 4 launchers/train_student.py --config configs/student_kd.yaml parallel.tp=2

Parse → validate → build → run → close, all in `pipeline.cli` (`distill train`), so the script and the
console command behave the same: same arguments, same errors (exit 2 for bad input), exit 75 after a
checkpoint saved on SIGUSR1/SIGTERM (requeue), 0 when the run is complete.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.cli import main

if __name__ == "__main__":
    # the deepspeed launcher passes --local_rank=N; LOCAL_RANK in the environment says the same
    sys.exit(main(["train", *(a for a in sys.argv[1:] if not a.startswith("--local_rank"))]))

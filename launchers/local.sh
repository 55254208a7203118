#!/usr/bin/env bash
# Run one pipeline stage on this machine: tokenize, cache, train or export, with torchrun for the
# distributed stages. What it is for: the same commands as slurm/, without a scheduler, with a header
# (commit, stage, world size, command line, resolved config) in front of the output so a log says
# what produced it. What it trades: one machine only (torchrun --standalone), and torchrun between
# the script and the ranks, which turns a worker's exit status 75 ("saved on a signal, requeue me")
# into 1; the Slurm scripts start one srun task per rank instead, so there the 75 reaches Slurm.
set -euo pipefail

# ---- knobs (override from the environment: NPROC=4 LOG_DIR=logs launchers/local.sh train ...)
NPROC="${NPROC:-1}"   # processes: torchrun ranks for cache/train, tokenizer workers for tokenize (one per core)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # the checkout this script belongs to
if [[ -z "${PYTHON:-}" ]]; then                           # the interpreter; default: the repo's .venv, else python3
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
LOG_DIR="${LOG_DIR:-}"   # optional: also write the header and the output to LOG_DIR/<stage>-<timestamp>.log
SIGNALS="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"   # torchrun forwards these to the trainer's ranks

usage() {
  cat <<EOF
usage: launchers/local.sh STAGE [ARGS...]

Run one stage of the pipeline on this machine (works from any directory; relative paths in ARGS are
relative to where you call it).

  tokenize ARGS   distill tokenize shard --workers \$NPROC ARGS   (a --workers in ARGS wins)
  cache    ARGS   torchrun --standalone --nproc-per-node \$NPROC launchers/cache_teacher.py ARGS
  train    ARGS   torchrun --standalone --nproc-per-node \$NPROC --signals-to-handle $SIGNALS
                      launchers/train_student.py ARGS
  export   ARGS   distill export ARGS

Before the stage it prints the git commit, the stage, NPROC and the command line; for cache and train
also the resolved config (distill config --kind cache|train --config FILE key=value...), and it stops
there if the config does not resolve.

Environment:
  NPROC=$NPROC      processes (torchrun ranks, or tokenizer workers)
  PYTHON=$PYTHON
  LOG_DIR=${LOG_DIR:-<unset>}   if set, the output is also written to LOG_DIR/<stage>-<timestamp>.log

Exit status: the stage's. Signals sent to this script (TERM, INT, HUP, QUIT, USR1) go on to the
stage. The trainer saves a checkpoint when signalled and exits 75 ("requeue me"), but torchrun turns
a worker's 75 into 1 (the checkpoint is saved all the same; with log.progress the log says "stop
requested ... saved step N"), so here 1 after a signal is not a failure. That is why slurm/ starts
one srun task per rank instead of torchrun: there Slurm sees the 75 and can requeue.

Examples:
  launchers/local.sh tokenize --input 'raw/*.txt' --tokenizer tok/ --out data/train --seq-len 2048
  NPROC=4 launchers/local.sh cache --config configs/cache_topk.yaml tokens=data/train output=cache/train
  NPROC=4 LOG_DIR=logs launchers/local.sh train --config configs/student_kd.yaml run_dir=runs/kd
  launchers/local.sh export --checkpoint runs/kd --out runs/kd/hf
EOF
}

die() { echo "local.sh: $*" >&2; echo >&2; usage >&2; exit 2; }

[[ $# -ge 1 ]] || die "missing STAGE"
case "$1" in -h|--help|help) usage; exit 0 ;; esac
STAGE="$1"; shift
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # `python -m pipeline` from a checkout, without installing
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
case "$STAGE" in
  tokenize) CMD=("$PYTHON" -m pipeline tokenize shard --workers "$NPROC" "$@") ;;
  cache)    CMD=("${TORCHRUN[@]}" "$REPO/launchers/cache_teacher.py" "$@"); KIND=cache ;;
  train)    CMD=("${TORCHRUN[@]}" --signals-to-handle "$SIGNALS" "$REPO/launchers/train_student.py" "$@"); KIND=train ;;
  export)   CMD=("$PYTHON" -m pipeline export "$@") ;;
  *)        die "unknown stage '$STAGE'" ;;
esac

if [[ -n "$LOG_DIR" ]]; then
  mkdir -p "$LOG_DIR"
  LOG="$LOG_DIR/$STAGE-$(date +%Y%m%d-%H%M%S).log"
  exec > >(tee -a "$LOG") 2>&1
  TEE_PID=$!
fi

# ---- header
COMMIT="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ "$COMMIT" != unknown ]] && ! git -C "$REPO" diff --quiet HEAD 2>/dev/null; then
  COMMIT="$COMMIT (+ uncommitted changes)"
fi
echo "=== local.sh $(date -Iseconds) on $(hostname)"
echo "commit:  $COMMIT"
echo "stage:   $STAGE"
echo "nproc:   $NPROC"
echo "command: $(printf '%q ' "${CMD[@]}")"
if [[ -n "${LOG:-}" ]]; then echo "log:     $LOG"; fi
if [[ -n "${KIND:-}" ]]; then
  # the config the stage will run with: --config FILE and the key=value overrides; other options
  # (cache's --shards START:STOP) carry no '=' and are left out
  CONFIG_ARGS=(--kind "$KIND")
  args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
      --config) CONFIG_ARGS+=(--config "${args[i + 1]:-}"); i=$((i + 1)) ;;
      --config=*) CONFIG_ARGS+=(--config "${args[i]#--config=}") ;;
      -*) ;;
      *=*) CONFIG_ARGS+=("${args[i]}") ;;
    esac
  done
  echo "resolved config ($(printf '%q ' distill config "${CONFIG_ARGS[@]}")):"
  status=0
  "$PYTHON" -m pipeline config "${CONFIG_ARGS[@]}" | sed 's/^/  /' || status=$?
  if [[ $status -ne 0 ]]; then echo "local.sh: the config does not resolve; $STAGE not started" >&2; exit "$status"; fi
fi
echo "==="

# ---- the stage: a child of this shell, so signals sent to the script (kill -USR1 PID) reach it
"${CMD[@]}" &
CHILD=$!
for sig in TERM INT HUP QUIT USR1; do
  # shellcheck disable=SC2064  # expand CHILD now
  trap "kill -s $sig $CHILD 2>/dev/null || true" "$sig"
done
status=0
wait "$CHILD" || status=$?
while kill -0 "$CHILD" 2>/dev/null; do   # wait was interrupted by a forwarded signal: the stage is still running
  status=0
  wait "$CHILD" || status=$?
done
if [[ -n "${TEE_PID:-}" ]]; then
  exec >&- 2>&-   # close the pipe to tee and let it write the last lines before we exit
  wait "$TEE_PID" 2>/dev/null || true
fi
exit "$status"

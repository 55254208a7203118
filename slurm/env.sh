# Shared environment of the sbatch scripts in slurm/: sourced, never run.
#
# What it sets, from Slurm's variables, so that every script starts ranks the same way:
#   DISTILL_ROOT   the checkout (default: the folder sbatch was run from, $SLURM_SUBMIT_DIR)
#   PYTHON         its interpreter (default: $DISTILL_ROOT/.venv/bin/python, else python3)
#   DEVICE         gpu or cpu (default auto: gpu when nvidia-smi finds one on the batch node)
#   MASTER_ADDR    the first node of the job (scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
#   MASTER_PORT    20000 + job id mod 20000, so jobs sharing a node do not collide
#   OMP_NUM_THREADS = --cpus-per-task; on cpu DS_ACCELERATOR=cpu, on gpu NCCL's async error handling
#   TORCHRUN_RDZV  the c10d rendezvous arguments for one torchrun per node (LAUNCHER=torchrun)
#   DISTILL_TP     parallel.tp of the resolved config (distill_header; 1 for tokenize), for the rank lines
# and the functions the scripts call: distill_header, distill_ranks, distill_requeue_on.
#
# Several nodes: every node's hostname must resolve, on every node, to an address the other nodes reach
# (the rendezvous connects to MASTER_ADDR, and gloo binds to the address of the rank's own hostname unless
# GLOO_SOCKET_IFNAME names an interface). Where hostnames resolve to a management network or loopback,
# export GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) before sbatch; the job's environment passes it to
# every rank. The header logs the master's resolved address and every rank's (or torchrun agent's) host.
# Ranks are numbered node by node (srun --distribution=block; torchrun: node rank × ranks per node + local
# rank), and a TP group is parallel.tp consecutive ranks, so with ranks per node a multiple of parallel.tp
# every TP group stays on one node (the header warns otherwise) and only data-parallel traffic crosses nodes.
#
# Design choice: ranks are started as one srun task per rank by default (LAUNCHER=srun), because srun
# passes SIGUSR1 on to every task and returns the tasks' exit status, so the trainer's "saved, requeue
# me" status 75 reaches the batch script; torchrun (one per node, c10d) turns a worker's 75 into 1. Either
# way a signalled attempt also checks the newest checkpoint's reason (see distill_requeue_on).

REQUEUE_EXIT_CODE=75
DISTILL_ATTEMPT_START=$(date +%s)
DISTILL_SIGNALLED=""

DISTILL_ROOT=${DISTILL_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$DISTILL_ROOT/pipeline/cli.py" ]; then
  echo "slurm/env.sh: $DISTILL_ROOT is not a checkout of the pipeline; submit from the repository root or" \
       "set DISTILL_ROOT" >&2
  exit 2
fi
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x "$DISTILL_ROOT/.venv/bin/python" ] && PYTHON=$DISTILL_ROOT/.venv/bin/python
fi
LAUNCHER=${LAUNCHER:-srun}
DEVICE=${DEVICE:-auto}
if [ "$DEVICE" = auto ]; then
  DEVICE=cpu
  command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1 && DEVICE=gpu
fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT PYTHON DISTILL_ROOT
export PYTHONPATH=$DISTILL_ROOT${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
if [ "$DEVICE" = gpu ]; then
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
else
  export DS_ACCELERATOR=cpu
fi
PROCS_PER_NODE=${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / ${SLURM_JOB_NUM_NODES:-1} ))}
TORCHRUN_RDZV=(--nnodes "${SLURM_JOB_NUM_NODES:-1}" --nproc-per-node "$PROCS_PER_NODE" --rdzv-backend c10d
               --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID")

# distill_header STAGE KIND ARGS...: what this job is, for the log (KIND: train, cache or - for none).
distill_header() {
  local stage=$1 kind=$2; shift 2
  echo "=== distill $stage | job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}" \
       "| restart ${SLURM_RESTART_COUNT:-0} | $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit $(git -C "$DISTILL_ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
       "| python $PYTHON | device $DEVICE | launcher $LAUNCHER"
  echo "layout: nodes ${SLURM_JOB_NUM_NODES:-1} ($SLURM_JOB_NODELIST), ranks ${SLURM_NTASKS:-1}," \
       "$PROCS_PER_NODE per node, master $MASTER_ADDR:$MASTER_PORT" \
       "($(getent hosts "$MASTER_ADDR" | awk '{print $1; exit}'))" \
       "${GLOO_SOCKET_IFNAME:+GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME}"
  echo "command: $*"
  if [ "$kind" != - ]; then
    local resolved
    resolved=$(distill_config "$kind" "$@")
    echo "resolved config:"
    echo "$resolved" | sed 's/^/  /'
    DISTILL_TP=$(echo "$resolved" | awk '/^parallel:/ {p = 1; next} /^[^ ]/ {p = 0} p && $1 == "tp:" {print $2}')
    case $DISTILL_TP in ''|*[!0-9]*|0) DISTILL_TP=1 ;; esac  # a bad value: the ranks refuse it, naming it
    export DISTILL_TP
    echo "tensor parallel: $DISTILL_TP ranks per replica, $(( ${SLURM_NTASKS:-1} / DISTILL_TP )) replicas;" \
         "a replica is $DISTILL_TP consecutive ranks, ranks are numbered node by node"
    if [ $(( PROCS_PER_NODE % DISTILL_TP )) -ne 0 ] && [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]; then
      echo "warning: $PROCS_PER_NODE ranks per node is not a multiple of parallel.tp=$DISTILL_TP: some replicas'" \
           "tensor-parallel ranks span two nodes (slow: every layer's collectives cross the network)" >&2
    fi
  fi
}

# distill_config KIND ARGS...: `distill config` of the --config file and key=value overrides among ARGS.
distill_config() {
  local kind=$1 config="" overrides=() skip=""; shift
  for arg in "$@"; do
    if [ -n "$skip" ]; then config=$arg; skip=""; continue; fi
    case $arg in
      --config) skip=1 ;;
      --config=*) config=${arg#--config=} ;;
      *=*) overrides+=("$arg") ;;
    esac
  done
  "$PYTHON" -m pipeline config --kind "$kind" ${config:+--config "$config"} "${overrides[@]}"
}

# distill_ranks SCRIPT ARGS...: run launchers/SCRIPT on every rank of the job and return its status.
# SIGUSR1 and SIGTERM sent to the batch script are passed on to the ranks. Each srun task first logs
# "rank R on HOST" (with parallel.tp > 1: "rank R on HOST (replica D, tp rank T)", D = R / tp, T = R mod tp;
# torchrun: "torchrun node N on HOST"), then execs the launcher in its place.
distill_ranks() {
  local script=$DISTILL_ROOT/launchers/$1; shift
  if [ "$LAUNCHER" = torchrun ]; then
    srun --kill-on-bad-exit=1 --ntasks-per-node=1 --ntasks="${SLURM_JOB_NUM_NODES:-1}" \
      bash -c 'echo "torchrun node $SLURM_NODEID on $(hostname)"; exec "$@"' distill \
      "$PYTHON" -m torch.distributed.run "${TORCHRUN_RDZV[@]}" \
      --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "$script" "$@" &
  else
    srun --kill-on-bad-exit=1 --distribution=block bash -c 'r=$SLURM_PROCID t=${DISTILL_TP:-1} part=""
      [ "$t" -gt 1 ] && part=" (replica $((r / t)), tp rank $((r % t)))"
      echo "rank $r on $(hostname)$part"; exec "$@"' distill "$PYTHON" "$script" "$@" &
  fi
  DISTILL_STEP_PID=$!
  trap 'echo "batch script: got SIGUSR1, passing it on"; DISTILL_SIGNALLED=1; kill -USR1 $DISTILL_STEP_PID' USR1
  trap 'echo "batch script: got SIGTERM, passing it on"; DISTILL_SIGNALLED=1; kill -TERM $DISTILL_STEP_PID' TERM
  local status again
  while true; do
    wait "$DISTILL_STEP_PID"; status=$?
    # above 128, wait may have returned early because a trapped signal arrived: wait again until srun ends
    [ "$status" -le 128 ] && break
    if ! kill -0 "$DISTILL_STEP_PID" 2> /dev/null; then
      wait "$DISTILL_STEP_PID"; again=$?
      [ "$again" -ne 127 ] && status=$again
      break
    fi
  done
  trap - USR1 TERM
  return "$status"
}

# distill_requeue_on STATUS [RUN_DIR]: requeue this job when the ranks saved because they were asked to stop:
# their status is 75, or (srun's --kill-on-bad-exit may end the last ranks before they exit by themselves,
# and torchrun reports 75 as 1) this attempt passed a signal on and RUN_DIR's newest checkpoint, written
# during this attempt, says it was saved for that.
distill_requeue_on() {
  local status=$1 run_dir=${2:-}
  if [ "$status" -ne "$REQUEUE_EXIT_CODE" ] && [ -n "${DISTILL_SIGNALLED:-}" ] && [ -n "$run_dir" ]; then
    "$PYTHON" - "$run_dir" "$DISTILL_ATTEMPT_START" <<'PY' && status=$REQUEUE_EXIT_CODE
import json, pathlib, sys
root, start = pathlib.Path(sys.argv[1]) / "checkpoints", float(sys.argv[2])
tag = (root / "latest").read_text().strip() if (root / "latest").is_file() else ""
run = root / tag / "run.json"
fresh = bool(tag) and run.is_file() and run.stat().st_mtime >= start
sys.exit(0 if fresh and json.loads(run.read_text()).get("reason") == "preempted" else 1)
PY
  fi
  if [ "$status" -eq "$REQUEUE_EXIT_CODE" ]; then
    echo "ranks saved a checkpoint and asked to be requeued (status $status): scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$status"
}

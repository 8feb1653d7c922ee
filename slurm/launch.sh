#!/usr/bin/env bash
# The body of every slurm/*.sbatch job (run as the batch script, which `exec`s it).
#
# One srun task per node runs slurm/node.sh, i.e. torchrun with c10d rendezvous on the first node. The warning
# signal Slurm sends the batch shell before the time limit (#SBATCH --signal=B:USR1@600; also SIGTERM) becomes a
# stop file (MEGATRON_DAPO_STOP_FILE): the trainer's ranks checkpoint at the next step boundary and exit with code
# 75 and a marker file; the job then requeues itself and the requeued run resumes from that checkpoint. A stalled
# rank (trainer.stall_timeout_s, megatron_dapo/watchdog.py) writes the same marker before its ranks exit: the job
# requeues and resumes from the last checkpoint. A crash restarts the workers inside the job first (MAX_RESTARTS,
# slurm/node.sh); a run that then finishes removes the marker, so a finished job is never requeued.
#
# Environment (defaults in brackets): CONFIG [set by the .sbatch], NPROC_PER_NODE [GPUs on the node, else 8],
# LOG_DIR [<repo>/logs], MASTER_PORT [20000 + job id % 10000], HEAD_ADDR [resolved below], CONTAINER_IMAGE and
# CONTAINER_MOUNTS [none: run on the host; set: pyxis --container-image/--container-mounts, which must mount the
# repository, LOG_DIR and the config's data, model and output folders at their own paths: checked below], and the
# NCCL/CUDA variables of slurm/env.sh (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME, ...).
set -euo pipefail

REPO="${MEGATRON_DAPO_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
cd "$REPO"
: "${CONFIG:?set CONFIG to a YAML config (the .sbatch files set it)}"
[[ -f "$CONFIG" ]] || { echo "launch.sh: CONFIG=$CONFIG not found (from $REPO)" >&2; exit 2; }
export CONFIG
export NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
(( NPROC_PER_NODE > 0 )) || { echo "launch.sh: no GPUs on the node: set NPROC_PER_NODE (processes per node)" >&2; exit 2; }
RESTART="${SLURM_RESTART_COUNT:-0}"  # unset on the first run
LOG_ROOT="${LOG_DIR:-$REPO/logs}"

# In a container the job sees only what CONTAINER_MOUNTS mounts, and every path (the repository it runs in
# place, logs, the config's files) must be the same inside: a missing one fails on every node after the queue.
mounted() {  # PATH: under a mount src[:dst[:flags]] whose dst is src
  local spec src dst
  local -a specs
  IFS=, read -ra specs <<<"$CONTAINER_MOUNTS"
  for spec in "${specs[@]}"; do
    IFS=: read -r src dst _ <<<"$spec"
    [[ "${dst:-$src}" == "$src" ]] || continue
    src="${src%/}"
    [[ "$1" == "$src" || "$1" == "$src/"* ]] && return 0
  done
  return 1
}
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
  CONTAINER_MOUNTS="${CONTAINER_MOUNTS:-}"
  # The config's paths, with the overrides, as the trainer resolves them (relative: from the repository)
  config_paths=$(PYTHONPATH="$REPO" python3 -c 'import os, sys
from megatron_dapo.config import load_config
c = load_config(sys.argv[1], sys.argv[2:])
for key, path in [("model.hf_path", c.model.hf_path), ("trainer.output_dir", c.trainer.output_dir),
                  ("trainer.save_dir", c.trainer.save_dir)] + [("data.train_files", f) for f in c.data.train_files] \
                 + [("data.val_files", f) for f in c.data.val_files]:
    if path:
        print(key, os.path.abspath(path))' "$CONFIG" "$@" 2>/dev/null) \
    || { echo "launch.sh: could not read the data and checkpoint paths of $CONFIG on this host (no python3 with the project): check that CONTAINER_MOUNTS mounts them" >&2; config_paths=""; }
  while read -r what path; do
    [[ -z "$path" ]] || mounted "$path" \
      || { echo "launch.sh: CONTAINER_MOUNTS=$CONTAINER_MOUNTS does not mount $path ($what): add $path:$path (the job uses the same paths inside the container)" >&2; exit 2; }
  done < <(printf 'repository %s\nLOG_DIR %s\n%s\n' "$REPO" "$LOG_ROOT" "$config_paths")
fi

LOG_DIR="$LOG_ROOT/$SLURM_JOB_ID"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/restart-$RESTART.log"  # one file per run: a requeue never overwrites a log
export MEGATRON_DAPO_REQUEUE_MARKER="$LOG_DIR/requeue-after-restart-$RESTART"
export MEGATRON_DAPO_STOP_FILE="$LOG_DIR/stop-requested-in-restart-$RESTART"
rm -f "$MEGATRON_DAPO_REQUEUE_MARKER" "$MEGATRON_DAPO_STOP_FILE"
# The warning goes to this shell alone (B:): signalling the job step would reach every process in it, ending
# torchrun and megatron-core's checkpoint helpers. Every rank looks for the file at each step end (LOG_DIR is on
# the file system the nodes share, as the repository is; one rank seeing it is enough).
warn() { echo "launch.sh: $1 received: the trainer checkpoints at the next step boundary" >>"$LOG"; touch "$MEGATRON_DAPO_STOP_FILE"; }
trap 'warn USR1' USR1
trap 'warn TERM' TERM

source "$REPO/slurm/head_address.sh"
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
HEAD_ADDR="${HEAD_ADDR:-$(head_address "$HEAD_NODE")}"
export HEAD_ADDR
# 20000-29999: the rendezvous store; SGLang's ports stay out of this range
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}"

# NCCL/CUDA variables, documented there; the gloo/NCCL interface from HEAD_ADDR (this shell runs on the head node)
source "$REPO/slurm/env.sh" >>"$LOG"

container=()
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
  container=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO")
  [[ -n "${CONTAINER_MOUNTS:-}" ]] && container+=(--container-mounts="$CONTAINER_MOUNTS")
fi

echo "job $SLURM_JOB_ID run $RESTART: $SLURM_JOB_NUM_NODES node(s) × $NPROC_PER_NODE, rendezvous $HEAD_ADDR:$MASTER_PORT, config $CONFIG, overrides: $*" | tee -a "$LOG"
srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --unbuffered "${container[@]}" \
  bash "$REPO/slurm/node.sh" "$@" >>"$LOG" 2>&1 &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do
  wait "$srun_pid" || true  # returns early when a trap runs
done
status=0
wait "$srun_pid" || status=$?  # its exit status (bash keeps it for its children)
if [[ -e "$MEGATRON_DAPO_REQUEUE_MARKER" ]]; then
  echo "launch.sh: requeueing job $SLURM_JOB_ID (run $RESTART: $(head -n1 "$MEGATRON_DAPO_REQUEUE_MARKER"))" | tee -a "$LOG"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"

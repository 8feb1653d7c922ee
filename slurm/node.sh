#!/usr/bin/env bash
# One node of a slurm/*.sbatch job (an srun task): torchrun (megatron_dapo/torchrun.py: a user error stays one
# line) with c10d rendezvous on HEAD_ADDR:MASTER_PORT.
set -euo pipefail
exec python -m megatron_dapo.torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$NPROC_PER_NODE" --rdzv-backend c10d \
  --rdzv-endpoint "$HEAD_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" \
  -m megatron_dapo train --config "$CONFIG" "$@"

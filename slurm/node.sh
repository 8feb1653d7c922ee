#!/usr/bin/env bash
# One node of a slurm/*.sbatch job (an srun task): torchrun with c10d rendezvous on HEAD_ADDR:MASTER_PORT.
# MAX_RESTARTS [2]: torchrun restarts the workers this often after a crash, inside the allocation; each restart
# resumes from the last checkpoint (trainer.resume).
set -euo pipefail
exec torchrun --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$NPROC_PER_NODE" --rdzv-backend c10d \
  --rdzv-endpoint "$HEAD_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" --max-restarts "${MAX_RESTARTS:-2}" \
  -m megatron_dapo train --config "$CONFIG" "$@"

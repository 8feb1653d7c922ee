#!/usr/bin/env bash
# One node of a slurm/*.sbatch job (an srun task; NeMo-Run's Slurm jobs run it too): torchrun with c10d
# rendezvous on HEAD_ADDR:MASTER_PORT, through megatron_dapo/torchrun.py (a user error stays one line).
#
# Node 0 hosts the rendezvous store because we say so (is_host), not because torchrun guesses it: left to guess,
# an agent hosts it only if HEAD_ADDR is what its host name resolves to (torch 2.13
# elastic/rendezvous/c10d_rendezvous_backend.py:137-145, utils.py:117 _matches_machine_hostname), which a
# GLOO_SOCKET_IFNAME address or Debian's 127.0.1.1 breaks: no agent hosts it and every node fails to connect.
# --local-addr: the workers' MASTER_ADDR is the address of the agent that the rendezvous ranks 0 (any node), by
# default its getfqdn() (dynamic_rendezvous.py:269, api.py:90), which can be unreachable the same way; each node
# gives its address on the gloo interface instead (HEAD_ADDR on node 0).
# MAX_RESTARTS [2]: torchrun restarts the workers this often after a crash, inside the allocation; each restart
# resumes from the last checkpoint (trainer.resume).
# torch 2.14.1 (the GPU pin) was not checked here; these lines are read from 2.13.0.
set -euo pipefail

if [[ "$SLURM_NODEID" == 0 ]]; then
  is_host=1 local_addr="$HEAD_ADDR"
else
  is_host=0 local_addr=""
  # its address on the gloo interface; none found (no `ip` in the container, say): torchrun's getfqdn()
  [[ -z "${GLOO_SOCKET_IFNAME:-}" ]] || local_addr=$(ip -4 -o addr show dev "${GLOO_SOCKET_IFNAME%%,*}" 2>/dev/null \
    | awk '{split($4, a, "/"); print a[1]; exit}') || local_addr=
fi
torchrun_args=(--nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$NPROC_PER_NODE"
  --rdzv-backend c10d --rdzv-endpoint "$HEAD_ADDR:$MASTER_PORT" --rdzv-id "$SLURM_JOB_ID" --rdzv-conf "is_host=$is_host"
  --max-restarts "${MAX_RESTARTS:-2}")
[[ -z "$local_addr" ]] || torchrun_args+=(--local-addr "$local_addr")
exec python -m megatron_dapo.torchrun "${torchrun_args[@]}" -m megatron_dapo train --config "$CONFIG" "$@"

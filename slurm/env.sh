# Environment of DAPO jobs on GPU clusters, sourced by slurm/launch.sh and by NeMo-Run jobs
# (examples/nemo_run/launch_dapo.py). Every variable keeps a value already set in the environment.

# One connection per device: Megatron's TP/SP communication overlap relies on kernels queued in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# Frees NCCL's buffers when a collective ends instead of recording them on streams (lower peak memory).
export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
# Colocated SGLang: weights reach it by CUDA IPC, which needs trainer and engine to agree on NCCL's cuMem
# allocator (SGLang sets 0 in its own processes unless set); NVLS multicast buffers take memory that the
# engines' KV cache needs (SGLang turns them off too).
export NCCL_CUMEM_ENABLE="${NCCL_CUMEM_ENABLE:-0}"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
# Which NICs NCCL and gloo use. Gloo carries the rollout control group and megatron-core's gloo groups on GPU
# too; unset, it binds to the address the host name resolves to (127.0.1.1 on Debian-style hosts) and cross-node
# gloo fails. So, given HEAD_ADDR (launch.sh and NeMo-Run jobs source this file on the head node after finding
# it), both default to the head node's interface that holds HEAD_ADDR (or routes to it): the nodes of a job are
# assumed to name that network's interface alike. Set them yourself on other clusters, e.g.
#   NCCL_IB_HCA=mlx5_0,mlx5_1,...   NCCL_SOCKET_IFNAME=bond0   GLOO_SOCKET_IFNAME=bond0
if [[ -n "${HEAD_ADDR:-}" && ( -z "${GLOO_SOCKET_IFNAME:-}" || -z "${NCCL_SOCKET_IFNAME:-}" ) ]]; then
  _head_ifname=$(ip -4 -o addr show to "$HEAD_ADDR/32" 2>/dev/null | awk '{print $2; exit}')
  [[ -n "$_head_ifname" ]] || _head_ifname=$(ip -4 -o route get "$HEAD_ADDR" 2>/dev/null \
    | awk '{for (i = 1; i < NF; i++) if ($i == "dev") {print $(i + 1); exit}}')
  if [[ -n "$_head_ifname" ]]; then
    [[ -n "${GLOO_SOCKET_IFNAME:-}" ]] || { export GLOO_SOCKET_IFNAME="$_head_ifname"; echo "env.sh: GLOO_SOCKET_IFNAME=$_head_ifname (the interface of the head address $HEAD_ADDR)"; }
    [[ -n "${NCCL_SOCKET_IFNAME:-}" ]] || { export NCCL_SOCKET_IFNAME="$_head_ifname"; echo "env.sh: NCCL_SOCKET_IFNAME=$_head_ifname (the interface of the head address $HEAD_ADDR)"; }
  else
    echo "env.sh: no interface holds or routes to the head address $HEAD_ADDR: set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME" >&2
  fi
  unset _head_ifname
fi
export PYTHONUNBUFFERED=1

# NCCL algorithm and channels (docs/design.md, "Engine start-up"; docs/pitfalls.md, 31): left to NCCL, the
# same on every rank. sglang.Engine() writes NCCL_ALGO, NCCL_MIN/MAX_NCHANNELS (deterministic inference),
# CUDA_DEVICE_MAX_CONNECTIONS=8 and more into the process that starts it; the trainer restores its own
# environment once the engine is up, so only SGLang's schedulers run with SGLang's values. Set NCCL_ALGO
# here, if at all, never per rank.

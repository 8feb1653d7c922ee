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
# Which NICs NCCL and gloo use: leave unset to let them choose, set on multi-NIC nodes (a link-local or
# container-bridge interface chosen by default is the most common launch failure). Examples:
#   NCCL_IB_HCA=mlx5_0,mlx5_1,...   NCCL_SOCKET_IFNAME=bond0   GLOO_SOCKET_IFNAME=bond0
export PYTHONUNBUFFERED=1

# NCCL algorithm and channels (docs/design.md, "Engine start-up"; docs/pitfalls.md, 27): left to NCCL, the
# same on every rank. sglang.Engine() writes NCCL_ALGO, NCCL_MIN/MAX_NCHANNELS (deterministic inference),
# CUDA_DEVICE_MAX_CONNECTIONS=8 and more into the process that starts it; the trainer restores its own
# environment once the engine is up, so only SGLang's schedulers run with SGLang's values. Set NCCL_ALGO
# here, if at all, never per rank.

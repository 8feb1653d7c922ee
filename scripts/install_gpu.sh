#!/usr/bin/env bash
# Install megatron-dapo on a GPU host, into the active Python environment (Python 3.10+):
#   bash scripts/install_gpu.sh              # torch 2.14.1 (CUDA 13), Transformer Engine 2.11.0, SGLang 0.5.23, NeMo-Run
#   bash scripts/install_gpu.sh --dry-run    # what pip would do; arguments go to pip; skips the toolchain checks
#
# Why it is not a plain `pip install -e '.[gpu]'`: transformer_engine_torch 2.11.0 is published as a source
# distribution only, whose build requires an unpinned `torch>=2.1` (its pyproject.toml). In pip's isolated build
# environment that resolves to the newest torch on the index: the extension is compiled against that torch, fails to
# load next to 2.14.1, and `import transformer_engine` hides the failure (its __init__ swallows the ImportError).
# PIP_CONSTRAINT pins torch in the build environments too (a `-c` option does not reach them).
# The build compiles CUDA code unless TE's setup finds a prebuilt wheel for this torch: it needs nvcc from a CUDA 13
# toolkit (CUDA_HOME; 2.11.0's build_tools/utils.py looks for no CUDA 13 runtime wheel in place of nvcc) and cuDNN
# headers, which torch's nvidia-cudnn-cu13 wheel ships (added to CPLUS_INCLUDE_PATH below). CUDA 13 torch needs an
# NVIDIA driver >= 580.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PIP_CONSTRAINT="$ROOT/scripts/constraints-gpu.txt"
export MEGATRON_DAPO_TORCH_VERSION=2.14.1
fail() { echo "install_gpu.sh: $1" >&2; exit 2; }

if [[ " $* " != *" --dry-run "* ]]; then
  nvcc="${CUDA_HOME:+$CUDA_HOME/bin/}nvcc"
  command -v "$nvcc" >/dev/null || fail "nvcc not found: install a CUDA 13 toolkit and set CUDA_HOME (Transformer Engine compiles against it)"
  [[ "$("$nvcc" --version)" == *"release 13."* ]] || fail "$nvcc is not CUDA 13: set CUDA_HOME to a CUDA 13 toolkit (torch 2.14.1 is built for CUDA 13)"
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1) || true
  [[ -n "$driver" && "${driver%%.*}" -ge 580 ]] || fail "NVIDIA driver ${driver:-not found}: CUDA 13 torch needs driver >= 580"
  python -m pip install "$@" torch==2.14.1  # first: its nvidia-cudnn-cu13 wheel carries the cuDNN headers TE includes
  cudnn_include=$(python -c "import nvidia.cudnn, os; print(os.path.join(nvidia.cudnn.__path__[0], 'include'))")
  export CPLUS_INCLUDE_PATH="$cudnn_include${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
fi
python -m pip install "$@" -e "$ROOT[gpu,launch]"

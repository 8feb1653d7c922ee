#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv with pinned CPU dependencies; source this file.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PIP_CONSTRAINT="$ROOT/scripts/constraints-cpu.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ ! -x "$ROOT/.venv/bin/megatron-dapo" ]] || [[ "$ROOT/setup.py" -nt "$ROOT/.venv/.installed" ]]; then
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/pip" install -q -e "$ROOT[dev,launch]"
  touch "$ROOT/.venv/.installed"
fi
export PATH="$ROOT/.venv/bin:$PATH"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"

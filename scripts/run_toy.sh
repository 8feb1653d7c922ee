#!/usr/bin/env bash
# The main job: the CPU toy DAPO run (creates .venv on first use). Extra arguments are config overrides.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
exec megatron-dapo train --config examples/configs/toy_cpu.yaml "$@"

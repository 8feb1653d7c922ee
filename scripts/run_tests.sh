#!/usr/bin/env bash
# The test suite: fast unit tests, then the functional (multi-process, end-to-end) tests.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
exec python -m pytest -q --durations=30 tests/unit tests/functional "$@"

#!/usr/bin/env bash
# The accelerator check: the whole suite on whatever GPU/TPU jax sees, as one JSON document.
# Meant to finish in under 5 minutes on an H100/H200; run from the repository root:
#   bash benchmarks/device_check.sh > device.json
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import jax; assert jax.default_backend() != 'cpu', 'no accelerator visible to jax'"
XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/run_all.py "$@"

#!/usr/bin/env bash
# The accelerator check (benchmarks/device_check.py): every GPU/TPU figure in one
# JSON file, benchmarks/results/device_check.json. Meant to finish in under 8
# minutes on one H200; run from anywhere:
#   bash benchmarks/device_check.sh
#   bash benchmarks/device_check.sh --smoke --out=/tmp/smoke.json   # on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/device_check.py \
  --out=benchmarks/results/device_check.json "$@"

#!/usr/bin/env bash
# One-shot GPU check (< 8 min on one GPU): train `tiny` and `paper` a few hundred steps with
# --device cuda on the sample data, segment a 16k slide, print MP/s, GPU memory and F1@0.5
# between CPU and GPU labels. See benchmarks/gpu_check.py. Fails with exit 2 and one line
# when no CUDA GPU is visible. Not part of `make test`.
#
#   benchmarks/gpu_check.sh [--work DIR] [--tiny-steps N] [--paper-steps N]
#   PYTHON=/path/to/python benchmarks/gpu_check.sh      (default: .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 900 "$PYTHON" benchmarks/gpu_check.py "$@"

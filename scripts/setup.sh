#!/usr/bin/env bash
# Create .venv (once) and install tilert with its test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  # A CPU build is enough for everything but the GPU runtimes; 2.13.0 is the pinned, tested release.
  python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
fi
log=$(mktemp)
if ! python -m pip install -q -e ".[dev]" >"$log" 2>&1; then cat "$log"; exit 1; fi
rm -f "$log"
# TileLang compiles Hopper kernels with nvcc when one is installed (no GPU needed).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi

#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. GPU tests skip cleanly without a Hopper GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export TILERT_KERNEL_CACHE=${TILERT_KERNEL_CACHE:-$PWD/.tilert-cache/kernels}
ruff check .
python -m pytest -q -p no:cacheprovider "$@"

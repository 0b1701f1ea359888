#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. GPU tests skip cleanly without a Hopper GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export TILERT_KERNEL_CACHE=${TILERT_KERNEL_CACHE:-$PWD/.tilert-cache/kernels}
ruff check .
# Two worker processes by default (TILERT_TEST_WORKERS): the kernel-compile tests are single-threaded
# and take most of the time; work stealing balances the long ones across the workers.
python -m pytest -q -p no:cacheprovider -n "${TILERT_TEST_WORKERS:-2}" --dist worksteal "$@"

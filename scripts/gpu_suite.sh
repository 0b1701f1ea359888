#!/usr/bin/env bash
# Run every GPU test (pytest marker `gpu`) on a GPU machine, RUNS times in a row with N workers
# sharing the GPU (several processes' persistent kernels at once: the shared-GPU case). The first run
# also builds whatever the kernel cache lacks (TILERT_KERNEL_CACHE; scripts/precompile_gpu.py fills
# it on a CPU machine beforehand). Logs go to OUTDIR/run<i>.log; one summary line per run on stdout.
# Usage: bash scripts/gpu_suite.sh OUTDIR [RUNS=3] [WORKERS=8] [extra pytest args...]
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUTDIR [RUNS] [WORKERS] [pytest args...]}
runs=${2:-3}
workers=${3:-8}
shift $(($# < 3 ? $# : 3))
mkdir -p "$out"
status=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  timeout "${TILERT_RUN_TIMEOUT:-480}" python -m pytest -q -p no:cacheprovider -m gpu -n "$workers" \
    --timeout "${TILERT_TEST_TIMEOUT:-300}" tests "$@" >"$out/run$i.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=$rc
  echo "run $i/$runs: exit $rc in $(($(date +%s) - start)) s: $(tail -n 1 "$out/run$i.log")"
  grep -E "^(FAILED|ERROR) " "$out/run$i.log" | head -n 20
done
exit $status

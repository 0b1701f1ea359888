#!/usr/bin/env bash
# Fresh machine -> installed tilert -> a compiled 8-GPU plan of the default model (mimo-v2.5-pro).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
MODEL=${MODEL:-mimo-v2.5-pro}
GPUS=${GPUS:-8}
python -m tilert compile --model "$MODEL" --gpus "$GPUS" --out "plans/$MODEL-$GPUS" "$@"
echo "plan written to plans/$MODEL-$GPUS (report: plans/$MODEL-$GPUS/report.md)"

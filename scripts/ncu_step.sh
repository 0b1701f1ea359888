#!/usr/bin/env bash
# Nsight Compute profile of one persistent step launch (GPU machine with ncu and nvdisasm).
#   bash scripts/ncu_step.sh OUT_DIR [ncu_step.py run options, e.g. --layers 4 --tokens 1]
# Writes OUT_DIR/step.ncu-rep, details.txt (the sections' summaries), sass.csv.gz (per-instruction
# warp samples), disasm.txt.gz (the kernel's SASS with line info) and device_kernel.cu, then prints
# `ncu_step.py report` (stall samples per opcode body and the hottest source lines).
set -euo pipefail
out=$1
shift
mkdir -p "$out"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -x "$NCU" ] || { echo "ncu not found" >&2; exit 2; }
tag=${TAG:-step}
"$NCU" --clock-control none -k regex:tilert_step --launch-skip 2 --launch-count 1 \
  --section WarpStateStats --section SourceCounters --section SpeedOfLight \
  --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
  --warp-sampling-interval 4 -f -o "$out/$tag" \
  python benchmarks/ncu_step.py run --source-out "$out/$tag-device_kernel.cu" "$@" | tee "$out/$tag-run.txt"
"$NCU" -i "$out/$tag.ncu-rep" --page details > "$out/$tag-details.txt" || true
"$NCU" -i "$out/$tag.ncu-rep" --page source --csv --print-source sass | gzip > "$out/$tag-sass.csv.gz"
# the library that ran: the cached kernel whose source is the one `run` wrote
dir=""
for f in "${TILERT_KERNEL_CACHE:-$HOME/.cache/tilert}"/*/*/kernels/*/device_kernel.cu; do
  if cmp -s "$f" "$out/$tag-device_kernel.cu"; then dir=$(dirname "$f"); fi
done
[ -n "$dir" ] || { echo "the step kernel's library is not in the kernel cache" >&2; exit 3; }
python benchmarks/ncu_step.py cubin --lib "$dir/executable.so" --out "$out/$tag.cubin"
"${CUDA_HOME:-/usr/local/cuda}/bin/nvdisasm" -gi -c "$out/$tag.cubin" | gzip > "$out/$tag-disasm.txt.gz"
rm -f "$out/$tag.cubin"
python benchmarks/ncu_step.py report --sass "$out/$tag-sass.csv.gz" --disasm "$out/$tag-disasm.txt.gz" \
  --source "$out/$tag-device_kernel.cu" --out "$out/$tag-report.json"

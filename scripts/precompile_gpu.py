"""Fill a kernel cache with the whole-step persistent kernels the GPU tests and benchmarks load, on a
machine without a GPU (meta tensors), so a short GPU session spends its time running, not
compiling. Usage: TILERT_KERNEL_CACHE=DIR python scripts/precompile_gpu.py [--bench]

Builds tiny-gpu's step kernels at world 1 (decode B=1/4/6, verify B=4: the GPU tests' shapes) and
world 2 (both ranks: the two-ranks-on-one-GPU test); with --bench also rank 0 of the 8-rank
mimo-v2.5-pro decode and verify steps (benchmarks/e2e.py). TileLang's own nvcc cubin cache
(cuda-binaries) is not needed once a kernel is cached, so --prune drops it to keep the cache small.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tilert.models.config import load_config  # noqa: E402
from tilert.runtime.persistent.backend import precompile  # noqa: E402

TINY = [(1, "decode", 1), (4, "decode", 1), (6, "decode", 1), (4, "verify", 1),
        (1, "decode", 2), (6, "decode", 2), (4, "verify", 2)]  # fmt: skip
BENCH = [(1, "decode", 8), (8, "verify", 8)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true", help="also the mimo-v2.5-pro rank-0 steps of benchmarks/e2e.py")
    ap.add_argument("--prune", action="store_true", help="drop TileLang's cubin cache afterwards")
    a = ap.parse_args()
    jobs = [("tiny-gpu", t, m, 256, w) for t, m, w in TINY]
    if a.bench:
        jobs += [("mimo-v2.5-pro", t, m, 4096 + 64, w) for t, m, w in BENCH]
    for model, tokens, mode, max_seq, world in jobs:
        t0 = time.time()
        precompile(load_config(model), tokens, mode, max_seq, world, peers=world > 1 and model == "tiny-gpu")
        print(f"{model} {mode} B={tokens} world {world}: {time.time() - t0:.0f} s", flush=True)
    cache = Path(os.environ.get("TILERT_KERNEL_CACHE", "~/.cache/tilert/kernels")).expanduser()
    if a.prune:
        for d in cache.glob("*/cuda-binaries"):
            shutil.rmtree(d)
    print(f"cache: {cache}")


if __name__ == "__main__":
    main()

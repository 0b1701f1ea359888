"""Nsight Compute's view of the persistent step kernel: where its warps stall, body by body.

`run` builds rank 0's step of the model cut to its first N layers (synthetic weights; routing pinned
as benchmarks/e2e.py's extra line, or by token with `--routing random`: the experts the synthetic
router picks, what a verify block streams) and launches only the persistent kernel, so ncu can
pick one launch:

    ncu --clock-control none -k regex:tilert_step --launch-skip 2 --launch-count 1 \
        --section WarpStateStats --section SourceCounters --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section LaunchStats -o OUT/step \
        python benchmarks/ncu_step.py run --layers 4 --tokens 1

`report` joins the exported per-instruction samples (`ncu -i OUT/step.ncu-rep --page source --csv
--print-source sass`) with the kernel's line table (`nvdisasm -g` of its cubin) and the generated
CUDA source, and prints the stall samples per opcode body and the hottest source lines:

    python benchmarks/ncu_step.py report --sass sass.csv.gz --disasm disasm.txt.gz --source device_kernel.cu

`codesize` prints the SASS bytes of each opcode body (no GPU: `cubin` carves the cubin out of a
cached kernel's executable.so, then `nvdisasm -gi -c`).
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
import json
import re
import sys
from pathlib import Path

import torch

from benchmarks.common import pin_routing, time_cuda
from tilert.abi import OPCODES
from tilert.engine.persistent import compile_step
from tilert.kernels.sass import carve_cubin
from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.profile.timeline import measured_trace
from tilert.runtime.eager.synthetic import synthetic_params
from tilert.runtime.persistent.step import PersistentStep

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run(a: argparse.Namespace) -> None:
    cfg = load_config(a.model)
    if a.layers:
        cfg = cfg.first_layers(a.layers)
    max_seq = a.context + 64
    mode = "verify" if a.tokens > 1 else "decode"
    g, sched = compile_step(build_step_graph(cfg, tokens=a.tokens, max_seq=max_seq, mode=mode), max_seq, a.world_size)
    params = synthetic_params(g, seed=0)
    if a.routing == "pinned":
        params = pin_routing(params, a.world_size)
    st = PersistentStep(g, sched.table, sched.counter_expected, params)
    if a.source_out:
        Path(a.source_out).write_text(st.kernel.get_kernel_source())
    inputs = {
        "tokens": torch.randint(0, cfg.vocab_size, (a.tokens,), dtype=torch.int32, device="cuda"),
        "positions": torch.arange(a.context, a.context + a.tokens, dtype=torch.int32, device="cuda"),
    }
    for _ in range(a.launches):
        st.launch(inputs)
        torch.cuda.synchronize()
    st.check()
    if a.time:
        ms = time_cuda(lambda: st.launch(inputs), iters=a.time, warmup=3)
        st.check()
        print(f"{g.name}: {ms:.3f} ms per step (median of {a.time})")
    if a.trace:
        st.run(inputs)
        Path(a.trace).write_bytes(gzip.compress(json.dumps(measured_trace(st), separators=(",", ":")).encode()))
    classes = collections.defaultdict(list)
    for i, node in enumerate(g.nodes):
        classes[int(st.node_class[i])].append(f"{i}:{node.op}:{node.outputs[0]}")
    for k, names in sorted(classes.items()):
        print(f"class {k}: {len(names)} nodes, e.g. {names[:3]}")
    print(f"ran {a.launches} launches of {g.name}: {int((sched.table[:, :, 0] != 0).sum())} tasks")


def _open(path: str) -> io.TextIOBase:
    return gzip.open(path, "rt") if path.endswith(".gz") else open(path)


def line_table(disasm: str) -> dict[int, int]:
    """SASS offset -> CUDA source line, from `nvdisasm -g` or `-gi` text (`//## File "...", line N`
    comments precede the instructions they cover; offsets are the `/*0a30*/` prefixes). With -gi a
    comment may add `inlined at "...", line M`: code inlined into the kernel source counts at M, so a
    prelude helper's instructions (DEVICE_PRELUDE sits at the top of the file) count in the body
    that called it."""
    table, line = {}, -1
    pat_line = re.compile(r'//## File "(.*?)", line (\d+)(?: inlined at "(.*?)", line (\d+))?')
    pat_off = re.compile(r"/\*([0-9a-f]{4,})\*/")
    with _open(disasm) as f:
        for s in f:
            m = pat_line.search(s)
            if m:  # a header's line (an inlined template) keeps the kernel line that called it
                if m.group(3) and m.group(3).endswith("tvm_kernels.cu"):
                    line = int(m.group(4))
                elif m.group(1).endswith("tvm_kernels.cu") and not m.group(3):
                    line = int(m.group(2))
                continue
            m = pat_off.search(s)
            if m:
                table[int(m.group(1), 16)] = line
    return table


def source_regions(source: str) -> list[tuple[int, str]]:
    """(first line, label) of each opcode case in the generated kernel: the dispatch is a chain of
    `if (code == K)` blocks, or a binary search whose bodies start with `tilert_body(K)` (node
    classes: `condval == C)` or `tilert_node_class(C)`), so a line belongs to the nearest case above it."""
    names = {v: k for k, v in OPCODES.items()}
    regions, opcode = [(0, "loop")], "?"
    for i, s in enumerate(Path(source).read_text().splitlines(), 1):
        m = re.search(r"\bcode == (\d+)\)", s) or re.search(r"\btilert_body\((\d+)\)", s)
        if m:
            opcode = names.get(int(m.group(1)), m.group(1))
            regions.append((i, opcode))
        m = re.search(r"\bcondval_\d+ == (\d+)\)", s) or re.search(r"\btilert_node_class\((\d+)\)", s)
        if m:  # the node class's body inside the opcode's case
            regions.append((i, f"{opcode}#{m.group(1)}"))
    return regions


def report(a: argparse.Namespace) -> dict:
    lines = line_table(a.disasm)
    regions = source_regions(a.source)
    src = Path(a.source).read_text().splitlines()
    with _open(a.sass) as f:
        lines_ = f.read().splitlines()
    head = next(i for i, s in enumerate(lines_) if s.startswith('"Address"') or s.startswith("Address"))
    rows = list(csv.DictReader(lines_[head:]))
    if not rows:
        raise SystemExit(f"{a.sass}: no rows")
    cols = list(rows[0])
    samp = next(c for c in cols if c.startswith("Warp Stall Sampling (All"))
    addr_col = next(c for c in cols if c.strip() in ("Address", "# Address"))
    stall_cols = [c for c in cols if c.startswith("stall_") or c.startswith("smsp__pcsamp_warps_issue_stalled")]

    def num(v: str) -> float:
        try:
            return float(v.replace(",", ""))
        except ValueError:
            return 0.0

    def region(line: int) -> str:
        lab = "loop"
        for first, name in regions:
            if first <= line:
                lab = name
        return lab

    base = min(int(r[addr_col], 16) if r[addr_col].startswith("0x") else int(num(r[addr_col])) for r in rows)
    per_region: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_line: collections.Counter = collections.Counter()
    per_line_ops: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    total = 0.0
    for r in rows:
        off = (int(r[addr_col], 16) if r[addr_col].startswith("0x") else int(num(r[addr_col]))) - base
        s = num(r[samp])
        total += s
        line = lines.get(off, -1)
        lab = region(line) if line > 0 else "?"
        per_region[lab]["samples"] += s
        for c in stall_cols:
            per_region[lab][c] += num(r[c])
        per_line[line] += s
        op = (r.get("Source") or "").split()[0:1]
        per_line_ops[line][op[0] if op else "?"] += s
    out = {"total_samples": total, "regions": {}, "lines": []}
    print(f"{total:.0f} warp samples")
    for lab, c in sorted(per_region.items(), key=lambda kv: -kv[1]["samples"]):
        top = sorted(((k, v) for k, v in c.items() if k != "samples"), key=lambda kv: -kv[1])[:4]
        out["regions"][lab] = dict(c)
        print(f"  {lab:16s} {100 * c['samples'] / total:5.1f}%  " + "  ".join(f"{k}={v:.0f}" for k, v in top))
    print("hottest source lines:")
    for line, s in per_line.most_common(a.top):
        text = src[line - 1].strip()[:110] if 0 < line <= len(src) else "?"
        ops = ",".join(f"{k}:{v:.0f}" for k, v in per_line_ops[line].most_common(3))
        out["lines"].append({"line": line, "samples": s, "region": region(line), "text": text, "ops": ops})
        print(f"  {100 * s / total:5.1f}% L{line:<6d} [{region(line)}] {ops}  {text}")
    return out


def code_size(disasm: str, source: str) -> dict[str, int]:
    """SASS bytes per opcode body (the `report` regions) of a kernel's `nvdisasm -gi` text: a body
    runs once per layer on an SM, so its code is fetched cold (ncu's no_instruction stalls), and
    its size is a cost of its own."""
    regions = source_regions(source)
    sizes: collections.Counter = collections.Counter()
    for _, line in line_table(disasm).items():
        lab = "?"
        if line > 0:
            lab = "loop"
            for first, name in regions:
                if first <= line:
                    lab = name
        sizes[lab] += 16  # one SASS instruction
    return dict(sizes.most_common())


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="mimo-v2.5-pro")
    r.add_argument("--world-size", type=int, default=8)
    r.add_argument("--layers", type=int, default=4)
    r.add_argument("--tokens", type=int, default=1)
    r.add_argument("--context", type=int, default=4096)
    r.add_argument("--routing", choices=("pinned", "random"), default="pinned",
                   help="pinned: one expert per rank for every token; random: the synthetic router's picks, by token")
    r.add_argument("--launches", type=int, default=4)
    r.add_argument("--source-out", default=None, help="write the step kernel's CUDA source here")
    r.add_argument("--time", type=int, default=0, help="also time this many launches (median ms)")
    r.add_argument("--trace", default=None, help="write one launch's measured trace here (.json.gz)")
    c = sub.add_parser("cubin")
    c.add_argument("--lib", required=True)
    c.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("--sass", required=True)
    p.add_argument("--disasm", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", default=None)
    z = sub.add_parser("codesize")
    z.add_argument("--disasm", required=True, help="nvdisasm -gi text of the kernel's cubin")
    z.add_argument("--source", required=True)
    a = ap.parse_args()
    if a.cmd == "run":
        run(a)
    elif a.cmd == "cubin":
        carve_cubin(a.lib, a.out)
    elif a.cmd == "codesize":
        sizes = code_size(a.disasm, a.source)
        for lab, b in sizes.items():
            print(f"  {lab:24s} {b / 1024:7.1f} KB")
        print(f"  {'total':24s} {sum(sizes.values()) / 1024:7.1f} KB")
    else:
        res = report(a)
        if a.out:
            Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""benchmarks/ncu_step.py's report: SASS offsets -> kernel source lines -> opcode bodies."""

import gzip

from benchmarks import ncu_step
from tilert.abi import OPCODES

SOURCE = """// prelude
__global__ void tilert_step_kernel() {
  int code = Tasks[0];
  if (code == LIN) {
    if (condval_2 == 1) {
      w = load();
    }
  } else {
    if (code == MOE) {
      e = List[slot];
    }
  }
}
""".replace("LIN", str(OPCODES["LINEAR_FP8"])).replace("MOE", str(OPCODES["MOE_GATE_UP"]))

DISASM = """\t//## File "/tmp/x/tvm_kernels.cu", line 3
        /*0000*/                   LDG.E R2, [R4.64] ;
\t//## File "/tmp/x/tvm_kernels.cu", line 6
        /*0010*/                   LDG.E.128 R8, [R6.64] ;
\t//## File "/usr/include/cutlass/barrier.h", line 15
        /*0020*/                   BAR.SYNC 0x0 ;
\t//## File "/tmp/x/tvm_kernels.cu", line 10
        /*0030*/                   LDG.E R3, [R2.64] ;
"""

CSV = """"Kernel Name","tilert_step_kernel",""
"Address","Source","Warp Stall Sampling (All Samples)","stall_long_sb"
"0x7f0000000000","LDG.E R2, [R4.64]","10","8"
"0x7f0000000010","LDG.E.128 R8, [R6.64]","30","25"
"0x7f0000000020","BAR.SYNC 0x0","20","0"
"0x7f0000000030","LDG.E R3, [R2.64]","40","40"
"""


def test_report_maps_samples_to_bodies(tmp_path, capsys):
    src, dis, sass = tmp_path / "k.cu", tmp_path / "d.txt.gz", tmp_path / "s.csv"
    src.write_text(SOURCE)
    dis.write_bytes(gzip.compress(DISASM.encode()))
    sass.write_text(CSV)
    table = ncu_step.line_table(str(dis))
    assert table == {0: 3, 0x10: 6, 0x20: 6, 0x30: 10}  # a header's line keeps the kernel line
    args = type("A", (), {"sass": str(sass), "disasm": str(dis), "source": str(src), "top": 5})()
    out = ncu_step.report(args)
    assert out["total_samples"] == 100
    assert out["regions"]["LINEAR_FP8#1"]["samples"] == 50  # lines 6 (the load and the inlined barrier)
    assert out["regions"]["MOE_GATE_UP"]["samples"] == 40
    assert out["regions"]["loop"]["samples"] == 10
    assert [(r["line"], r["region"]) for r in out["lines"]] == [(6, "LINEAR_FP8#1"), (10, "MOE_GATE_UP"), (3, "loop")]


DISASM_INLINE = """\t//## File "/tmp/x/tvm_kernels.cu", line 6
        /*0000*/                   LDG.E.128 R8, [R6.64] ;
\t//## File "/tmp/x/tvm_kernels.cu", line 1 inlined at "/tmp/x/tvm_kernels.cu", line 10
        /*0010*/                   PRMT R2, R8, 0x5410, R9 ;
        /*0020*/                   HMUL2.BF16_V2 R2, R2, R3 ;
\t//## File "/usr/include/cute/mma.hpp", line 40 inlined at "/tmp/x/tvm_kernels.cu", line 6
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R2, R4 ;
\t//## File "/usr/include/cute/arch.hpp", line 7 inlined at "/usr/include/cute/mma.hpp", line 40
        /*0040*/                   NOP ;
"""


def test_inlined_prelude_code_counts_in_its_caller(tmp_path):
    # nvdisasm -gi: a prelude helper (line 1) inlined into a body counts at the body's line; a
    # header inlined into a header keeps the last kernel line
    src, dis = tmp_path / "k.cu", tmp_path / "d.txt"
    src.write_text(SOURCE)
    dis.write_text(DISASM_INLINE)
    assert ncu_step.line_table(str(dis)) == {0: 6, 0x10: 10, 0x20: 10, 0x30: 6, 0x40: 6}
    assert ncu_step.code_size(str(dis), str(src)) == {"LINEAR_FP8#1": 48, "MOE_GATE_UP": 32}

"""bench/cuda_ptx.py: the CUDA kernels compiled to PTX by pip's NVVM and
linked to a cubin by pip's nvJitLink, without a GPU (one kernel, dtype and
architecture here; cluster/test/image-kernels.sh does all of them in the
image); and the per-pixel measure's reading of PTX."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "cuda_ptx.py"
sys.path.insert(0, str(ROOT / "bench"))
import cuda_ptx  # noqa: E402

needs_compiler = pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None
                                    or importlib.util.find_spec("cuda.bindings") is None,
                                    reason="needs numba-cuda[cu13] (the dali extra)")


@needs_compiler
def test_a_kernel_compiles_and_links_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "9.0", "--dtype", "float16", "--kernels", "pixel"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "NVVM: nvidia-nvvm" in lines[0] and "nvJitLink" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("pixel -> float16, sm_90: PTX ")
    assert "0 fused multiply-adds; linked: cubin" in lines[1]


@needs_compiler
def test_ptx_that_does_not_link_is_reported():
    ptx = "\n".join([".version 99.0", ".target sm_90", ".address_size 64", ".visible .entry k()", "{", "ret;", "}"])
    with pytest.raises(RuntimeError, match="nvJitLink"):
        cuda_ptx.link(ptx, (9, 0), "k")


# A loop (header line 10, body line 11) at source loop depth 0: its entry
# code before the loop, its compare at the loop's end; the body's block
# twice, the second a compiler copy (other registers).
PTX = """
.loc 1 9 1
mov.u64 %rd1, 0;
.loc 1 10 1
div.s64 %rd2, %rd3, %rd4;
@%p1 bra $L__BB0_3;
$L__BB0_1:
.loc 1 11 1
add.s64 %rd1, %rd1, 1;
mul.lo.s64 %rd5, %rd1, 3;
@%p2 bra $L__BB0_2;
.loc 1 11 1
add.s64 %rd6, %rd6, 1;
mul.lo.s64 %rd7, %rd6, 3;
@%p4 bra $L__BB0_2;
$L__BB0_2:
.loc 1 10 1
setp.lt.s64 %p3, %rd1, %rd2;
@%p3 bra $L__BB0_1;
$L__BB0_3:
.loc 1 12 1
ret;
"""


def test_the_measure_splits_a_loop_header_and_counts_a_copy_once():
    unit = {9: 9, 10: 10, 11: 11, 12: 12}
    per = cuda_ptx.ptx_by_statement(PTX, unit, {10: (11, 0)})
    # line 10's entry: the division and the branch around the loop; per iteration: the compare and the branch back;
    # line 11: its block once (the second is the same code on other registers)
    assert per == {"9": (1, 0), "10:e": (2, 1), "11": (3, 0), "10:i": (2, 0), "12": (1, 0)}

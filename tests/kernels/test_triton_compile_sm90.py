"""Every Triton kernel, forward and backward, compiles for sm_90 (a cubin, through ptxas) with the installed
Triton, without a GPU: the interpreter that runs the other Triton tests here never lowers a kernel, so a
kernel that the GPU image's Triton cannot compile would otherwise pass CI. The specializations are the
launchers' own (GPU tile sizes and argument types; each constexpr branch in float32, every kernel in float16,
bfloat16 and float64 too): see tests/helpers/triton_compile_sm90.py, run in a subprocess with TRITON_INTERPRET
unset (about 80 s of CPU time, two processes)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "helpers" / "triton_compile_sm90.py"
API_UNKNOWN = 2  # the script's exit status when this Triton's compile API is not the one it knows


def test_every_triton_kernel_compiles_for_sm90():
    """The script's summary names each kernel that failed to compile, with its specialization and error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode == API_UNKNOWN:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-4000:]}"

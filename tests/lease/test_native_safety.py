"""The project never hands a CPU kernel a layout known to corrupt memory.

oneDNN's AVX2 ``brgconv_strided`` backward-data kernel, which torch picks for a 1x1
stride-2 convolution on a channels-last float32 input with fewer than 8 channels,
writes out of bounds (glibc aborts, or the process hangs, or numbers silently go
wrong). The shapes that reached it were ``FactorizedReduce`` at C=2 and the ResNet
shortcut at width 1/16. Each case runs in a child process with the AVX2 code paths
forced, so the test fails with the child's stderr instead of taking pytest down,
whatever instruction set this machine has.
"""
import os
import subprocess
import sys

import pytest

from tests.subproc import ROOT, child_env, describe

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
DRIVER = os.path.join(ROOT, "tests", "lease", "native_shapes.py")
DTYPES = ("float32", "float64")


@pytest.mark.parametrize("case,iterations", [("factorized_reduce", 300), ("resnet", 100), ("supernet", 40)])
def test_narrow_strided_convolutions_survive_forward_and_backward_on_avx2(case, iterations):
    """Both dtypes in one child (one interpreter start per case); its "ok" lines say which dtype got through."""
    env = child_env(PYTHONPATH=ROOT, **AVX2)
    try:
        proc = subprocess.run([sys.executable, DRIVER, case, ",".join(DTYPES), str(iterations)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:    # heap corruption can also end in a malloc deadlock
        pytest.fail(f"{case}: the child hung for 300 s (a corrupted heap can deadlock malloc)\n"
                    f"{(e.stdout or b'')[-500:]!r}\n{(e.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, (f"{case}: {describe(proc.returncode)} after {proc.stdout.strip()!r}\n"
                                  f"--- child stderr ---\n{proc.stderr[-3000:]}")
    assert [line.split()[:3] for line in proc.stdout.splitlines()] == [["ok", case, d] for d in DTYPES]

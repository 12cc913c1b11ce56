"""The GGUF matmul's AVX-512 VNNI path on a CPU without AVX-512: compiled with its intrinsics emulated by
SIMDe (the `simde-py` package's headers; csrc/simde_avx512.h), it passes test_ggml_kernels.py, whose
tests compare every path's bits with the portable one's.

Our machines differ (Xeon with AVX-512, Zen 3 with AVX2 only, Zen 4 with AVX-512 but no AMX): without this,
an AVX2 machine never runs the hand-written code the AVX-512 ones run. A CPU with AVX-512 VNNI runs that path
natively in the other tests and skips this one. Run as a script, this file is the emulated run itself.
(The paged attention's AVX-512 build is at::vec's 512-bit code, which SIMDe 0.8.2 does not cover whole.)
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm import kernels

ROOT = Path(__file__).resolve().parents[1]
# -O1: the emulation compiles in about a minute instead of five; only AVX-512 is emulated (x86-64-v3 is native)
FLAGS = ["-O1", "-march=x86-64-v3", "-DMINILLM_SIMDE_AVX512"]


@pytest.mark.slow
def test_avx512_vnni_path_emulated_passes_the_kernel_tests():
    # (checked here, not in skipif marks: run as a script, this file must load no native kernel first)
    if not kernels.ops_available() or kernels.best_isa() == "avx512_vnni":
        pytest.skip("this CPU runs the AVX-512 paths natively (or has no C++ kernels)")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the emulated build targets x86-64-v3")
    if importlib.util.find_spec("simde_py") is None:
        message = "simde-py is not installed (pip install simde-py==0.8.2.post1; .ci/run does)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    run = subprocess.run([sys.executable, __file__], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "emulated: avx512_vnni" in run.stdout


def main() -> int:
    import simde_py

    kernels.compile_extension("ggml", [*FLAGS, f"-I{simde_py.get_include()}"], "minillm_ggml_emulated")
    kernels._loaded["ggml"] = True
    print("emulated:", kernels.best_isa(), flush=True)
    return pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_ggml_kernels.py"])


if __name__ == "__main__":
    sys.exit(main())

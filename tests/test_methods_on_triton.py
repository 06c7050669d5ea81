"""The methods' brute-force tests once more, through the Triton kernels (the interpreter on CPU).

The suite runs the methods on the PyTorch reference kernels on CPU; the GPU runs the Triton kernels. This pass
runs the brute-force and exactness tests of the methods with ``DIT_ACCEL_KERNELS=triton`` in a fresh process
(Triton chooses interpreter or compiler when it is imported), so a Triton kernel that disagrees with the
reference inside a real method call fails CI without a GPU. About 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dit_accel.kernels as kernels

TESTS = Path(__file__).parent / "methods"
FILES = ("test_rettention.py", "test_sla.py", "test_paper_sla.py", "test_vmoba.py", "test_patterns.py")
#: the brute-force / exactness tests; the two largest official-SLA shapes are left to the reference pass
SELECT = "(brute or match or exact or dense or official) and not 2088 and not 1536"


@pytest.mark.slow
@pytest.mark.skipif(not kernels._triton_available(), reason="Triton is not installed")
def test_method_brute_force_tests_pass_on_the_triton_kernels() -> None:
    env = dict(os.environ, DIT_ACCEL_KERNELS="triton", TRITON_INTERPRET="1")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", SELECT]
    done = subprocess.run(
        [*command, *(str(TESTS / f) for f in FILES)], env=env, capture_output=True, text=True, timeout=1500
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in summary and "deselected" in summary, summary  # the selection really ran tests

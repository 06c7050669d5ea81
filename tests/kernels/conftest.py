"""Kernel tests run the Triton kernels under ``TRITON_INTERPRET=1`` on a CPU, compiled on a GPU.

Triton decides between interpreter and compiler when a module with ``@triton.jit`` functions is imported, its own
``triton.language`` included, so the variable must be set before ``import triton``. ``import diffusers`` (and so
``import dit_accel``) imports Triton: this conftest sets the variable when it is loaded, which comes first when
this folder is collected first (``pytest tests`` collects ``tests/kernels`` before ``tests/test_*.py``) or alone.
If Triton was imported earlier in the process anyway, the in-process Triton tests skip and
``test_interpreter_subprocess.py`` runs this folder in a fresh interpreter instead, so nothing goes untested.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch  # importing torch does not import Triton; importing dit_accel (diffusers) does

HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:
    IN_PROCESS = True
    # correctness tests: the default launch configuration, no benchmarking of every small shape (the autotuner has
    # its own test in test_gpu_kernels.py)
    os.environ.setdefault("DIT_ACCEL_AUTOTUNE", "0")
else:
    _already = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
    IN_PROCESS = _already or "triton" not in sys.modules
    if IN_PROCESS:
        os.environ["TRITON_INTERPRET"] = "1"

import kernel_helpers  # noqa: E402  (after the variable: it imports dit_accel and so Triton)

kernel_helpers.IN_PROCESS = IN_PROCESS


@pytest.fixture
def device() -> torch.device:
    """Where the Triton kernels run: the GPU when there is one, else the CPU through the interpreter."""
    if not kernel_helpers.IN_PROCESS:
        pytest.skip("Triton was imported compiled before this conftest; test_interpreter_subprocess runs this test")
    return torch.device("cuda" if HAS_CUDA else "cpu")

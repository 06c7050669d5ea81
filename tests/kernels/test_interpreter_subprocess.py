"""Fallback: the Triton tests of this folder in a fresh Python when this process cannot interpret them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kernel_helpers
import pytest


def test_triton_tests_in_a_fresh_interpreter() -> None:
    if kernel_helpers.IN_PROCESS:
        pytest.skip("the Triton tests run in this process")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=here.parents[1])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]

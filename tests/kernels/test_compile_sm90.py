"""Every Triton kernel compiles for Hopper (sm_90) on this CPU-only machine, and the default block-sparse
configurations fit in registers (no spills): the compiled path the interpreter tests cannot see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels run in the other tests")
def test_kernels_compile_for_sm90_without_spills() -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, str(HERE / "compile_sm90.py")], env=env, capture_output=True, text=True, timeout=600
    )
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows, result.stderr[-3000:]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    for row in rows:
        if row["name"].startswith("bsa-default") and row["spill_stack"] is not None:
            assert row["spill_stack"] == 0, row
    assert len(rows) >= 14

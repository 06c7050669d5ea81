"""Shared fixtures: fresh random seeds per run (printed, so a failure can be replayed) and tiny pipelines."""

from __future__ import annotations

import os
import random

import pytest
import torch  # importing torch does not import Triton; importing dit_accel (through diffusers) does

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton picks interpreter or compiler when its modules are imported: set this before anything imports
    # dit_accel, so the kernel tests run in-process under the interpreter (see tests/kernels/conftest.py).
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng(request) -> torch.Generator:
    """A generator seeded freshly each run; the seed is in the test's report on failure."""
    seed = int(os.environ.get("DIT_ACCEL_TEST_SEED", random.randrange(1 << 30)))
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)

#!/usr/bin/env python
"""Quality-vs-speed sweep; the same as ``dit-accel sweep`` (every option is shared, see docs/sweep.md).

Examples::

    python scripts/sweep.py --model tiny-wan --methods blocktopk,sla --sparsity 0.8,0.9 --out runs/sweep
    accelerate launch --multi_gpu --num_processes 2 scripts/sweep.py --out runs/sweep  # split over 2 processes
"""

from __future__ import annotations

import sys

from dit_accel.cli import app

if __name__ == "__main__":
    app(["sweep", *sys.argv[1:]], prog_name="sweep.py")

"""What each preset runs per step of a few-step generation (4 or 8 steps, as distilled LoRAs use).

Runs every preset on the tiny random Wan pipeline (2 self-attention sites, CFG) and records, per step, what its
calls did: D dense (``dense_step``), R refresh (full attention, statistics collected), S sparse. Prints a
Markdown table (the one in docs/methods.md, "Few-step schedules").

    python scripts/few_step_schedule.py --steps 4 8
"""

from __future__ import annotations

import argparse

import torch

import dit_accel
from dit_accel.testing import tiny_pipeline

LETTER = {"dense": "D", "refresh": "R", "sparse": "S"}


def step_kinds(method: str, steps: int) -> str:
    """One letter per step (several when the sites or branches of a step differ)."""
    pipe, kwargs = tiny_pipeline("wan")
    kwargs = dict(kwargs, num_inference_steps=steps)
    by_step: dict[int, set[str]] = {}

    def observe(event) -> None:
        by_step.setdefault(event.step, set()).add(LETTER[event.kind])

    with dit_accel.accelerate(pipe, method, min_tokens=64) as handle:
        next(iter(handle.accelerators.values())).observers.append(observe)
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    return " ".join("".join(sorted(by_step.get(s, {"-"}))) for s in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--methods", nargs="+", default=[m for m in dit_accel.METHODS if m != "dense"])
    args = parser.parse_args()
    print("| preset | schedule | " + " | ".join(f"{n} steps" for n in args.steps) + " |")
    print("|---|---|" + "---|" * len(args.steps))
    for method in args.methods:
        schedule = dit_accel.PRESETS[method].schedule
        what = f"dense_steps {schedule.dense_steps}, refresh_every {schedule.refresh_every}"
        cells = [step_kinds(method, n) for n in args.steps]
        print(f"| `{method}` | {what} | " + " | ".join(f"`{c}`" for c in cells) + " |")


if __name__ == "__main__":
    main()

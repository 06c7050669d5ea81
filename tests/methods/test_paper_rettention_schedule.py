"""``rettention-paper`` runs the official schedule of the model it is on (cccrrrccc/Re-ttention, commit bbec1f5):
``module/Cog_processor.py`` keeps steps 0-14 dense and refreshes when ``step % 5 == 0``;
``module/pixart_processor.py`` keeps steps 0-4 dense and refreshes at steps 5, 10 and 15. Families without an
official schedule keep CogVideoX's 15 of 50 steps as a fraction (0.3)."""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel.testing import tiny_pipeline


def official_kinds(family: str, num_steps: int) -> list[str]:
    """Per step: "dense", "refresh" or "sparse", as the official processors decide (re-implemented)."""
    warm = {"cogvideox": 15, "pixart": 5}[family]
    kinds = []
    for step in range(num_steps):
        if step < warm:
            kinds.append("dense")
        elif step % 5 == 0:
            kinds.append("refresh")
        else:
            kinds.append("sparse")
    return kinds


class _StepKinds:
    def __init__(self) -> None:
        self.by_step: dict[int, set[str]] = {}

    def __call__(self, event) -> None:
        kind = event.kind if event.kind != "dense" or event.reason == "dense_step" else "other"
        self.by_step.setdefault(event.step, set()).add(kind)


@pytest.mark.parametrize(("family", "steps"), [("cogvideox", 22), ("pixart", 17)])
def test_the_official_schedule_of_the_family_runs(family, steps):
    pipe, kwargs = tiny_pipeline(family)
    kwargs = dict(kwargs, num_inference_steps=steps)
    with dit_accel.accelerate(pipe, "rettention-paper", min_tokens=0) as handle:
        acc = next(iter(handle.accelerators.values()))
        seen = _StepKinds()
        acc.observers.append(seen)
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        schedule = handle.stats()["schedules"]["transformer"]
    assert schedule["dense_steps"] == official_kinds(family, steps).count("dense")
    got = [sorted(seen.by_step[s] - {"other"}) for s in range(steps)]
    assert got == [[kind] for kind in official_kinds(family, steps)]


def test_schedule_fields_you_give_win_over_the_family_schedule():
    pipe, _ = tiny_pipeline("pixart")
    with dit_accel.accelerate(pipe, "rettention-paper", dense_steps=2) as handle:
        schedule = handle.stats()["schedules"]["transformer"]
    assert (schedule["dense_steps"], schedule["refresh_every"]) == (2, 5)
    pipe, _ = tiny_pipeline("wan")  # no official schedule for Wan: the preset's own
    with dit_accel.accelerate(pipe, "rettention-paper") as handle:
        assert handle.stats()["schedules"]["transformer"]["dense_steps"] == 0.3

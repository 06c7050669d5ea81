"""Host syncs in the denoising loop: none per attention call, at most a fixed few per transformer forward.

Counted on CPU with a ``TorchFunctionMode`` that sees every tensor method that copies a value to the host (on a GPU
each of these waits for the stream). The PyTorch reference kernels (``dit_accel.kernels.reference``, the CPU oracle:
on CUDA the Triton kernels run) are left out of the count; geometry cached per sequence shape (a site's plan) may
sync once, so the test asserts the count does not grow with the number of steps.
"""

from __future__ import annotations

import pytest
import torch

import dit_accel
from dit_accel.testing import HostSyncCounter, tiny_pipeline


def _spy(counter: HostSyncCounter, obj, name: str, where: str) -> None:
    original = getattr(obj, name)

    def spied(*args, **kwargs):
        outer, counter.where = counter.where, where
        try:
            return original(*args, **kwargs)
        finally:
            counter.where = outer

    setattr(obj, name, spied)  # on this instance only


def _count(method: str, options: dict, steps: int, family: str = "wan") -> tuple[dict[str, int], dict]:
    pipe, kwargs = tiny_pipeline(family)
    kwargs = dict(kwargs, num_inference_steps=steps)
    handle = dit_accel.accelerate(pipe, method, min_tokens=64, dense_steps=1, **options)
    counter = HostSyncCounter()
    acc = handle.accelerators["transformer"]
    for site in acc.sites:
        _spy(counter, site, "attend", "attention")
    _spy(counter, acc, "begin_forward", "forward")
    _spy(counter, acc, "end_forward", "forward")
    forwards = 0
    begin = acc.begin_forward

    def counted(*args, **kwargs):
        nonlocal forwards
        forwards += 1
        return begin(*args, **kwargs)

    acc.begin_forward = counted
    try:
        with counter:
            pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        stats = handle.stats()["overall"]
    finally:
        handle.remove()
    return dict(counter.counts, forwards=forwards), stats


@pytest.mark.parametrize(
    "method, options",
    [("rettention", {"refresh_drift": 0.05}), ("sla", {}), ("vmoba", {}), ("blocktopk", {})],
)
def test_no_host_sync_per_attention_call(method, options):
    short, _ = _count(method, options, 3)
    long, stats = _count(method, options, 6)
    assert stats["sparse_calls"] + stats["refresh_calls"] > 0
    # 3 more steps x 2 CFG passes x 2 sites of sparse calls add no sync inside attention
    assert long.get("attention", 0) == short.get("attention", 0), (short, long)
    assert long.get("attention", 0) <= 4, long  # the cached geometry of a site (plan) at most
    added = long.get("forward", 0) - short.get("forward", 0)
    assert added <= 3 * 6, (short, long)  # a fixed few per transformer forward (6 forwards more)


@pytest.mark.parametrize(
    "family",
    [
        "flux",
        "hunyuan_video",
        "cogvideox",
        "ltx_video",
        "pixart",
        "wan_i2v",
        "cosmos",
        "mochi",
        "ltx2_video",
        "hunyuan_video15",
        "minimax_h3",
    ],
)
def test_host_syncs_per_forward_in_each_family(family):
    """Step matching (scheduler timesteps copied to the host once, not an argmin per forward) and layout reading
    (Flux's img_ids extent read once per generation) cost at most one sync per forward: the timestep's value."""
    short, _ = _count("blocktopk", {}, 3, family)
    long, stats = _count("blocktopk", {}, 6, family)
    assert stats["sparse_calls"] > 0
    assert long.get("attention", 0) == short.get("attention", 0), (short, long)
    added = long.get("forward", 0) - short.get("forward", 0)
    assert 0 < long["forwards"] - short["forwards"] and added <= long["forwards"] - short["forwards"], (short, long)

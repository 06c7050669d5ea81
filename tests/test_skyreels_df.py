"""SkyReels-V2 diffusion forcing: one timestep per latent frame, and how the step schedule reads it.

The pipeline opens ``cache_context("cond"/"uncond")`` without a step index, so the step comes from matching the
forward's timestep against the scheduler's timesteps; with one timestep per frame the tracker takes the largest,
the noisiest frame's. Synchronous mode (``ar_step=0``) gives every frame the same timestep: steps 0, 1, 2 as in
any pipeline. Asynchronous mode (``ar_step > 0``) staggers the frames: more iterations than steps, and an
iteration counts as the step of its noisiest frame, so ``dense_steps`` and ``refresh_every`` count those steps.
"""

from __future__ import annotations

import warnings

import torch

import dit_accel
from dit_accel.testing import tiny_pipeline

LAYERS, BRANCHES = 2, 2


def run(pipe, kwargs, **extra):
    return pipe(**dict(kwargs, **extra), generator=torch.Generator().manual_seed(0)).frames


def test_synchronous_diffusion_forcing_counts_the_pipelines_steps():
    pipe, kwargs = tiny_pipeline("skyreels_v2_df")
    with dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, dense_steps=1) as handle:
        run(pipe, kwargs)
        stats = handle.stats()
    expert = stats["transformers"]["transformer"]
    assert expert["steps"] == [0, 1, 2] and expert["forwards"] == 3 * BRANCHES
    assert stats["overall"]["dense_reasons"] == {"dense_step": BRANCHES * LAYERS}
    assert stats["overall"]["sparse_calls"] == 2 * BRANCHES * LAYERS
    assert stats["steps_backwards"] == 0


def test_asynchronous_diffusion_forcing_counts_the_noisiest_frames_step():
    pipe, kwargs = tiny_pipeline("skyreels_v2_df")
    with dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, dense_steps=1) as handle:
        run(pipe, kwargs, ar_step=1, num_inference_steps=4)
        stats = handle.stats()
    expert = stats["transformers"]["transformer"]
    # 2 latent frames staggered by one step: 5 iterations whose noisiest frames are at steps 0, 0, 1, 2, 3
    assert expert["forwards"] == 5 * BRANCHES and expert["steps"] == [0, 1, 2, 3]
    assert stats["overall"]["dense_reasons"] == {"dense_step": 2 * BRANCHES * LAYERS}  # both step-0 iterations
    assert stats["overall"]["sparse_calls"] == 3 * BRANCHES * LAYERS
    assert stats["steps_backwards"] == 0


def test_block_causal_attention_stays_dense_and_exact():
    """With causal blocks of frames (``causal_block_size`` > 1) self-attention gets a boolean (1, 1, N, N)
    block-causal mask, not key padding: every call stays dense (``attn_mask``), bit-exact."""
    pipe, kwargs = tiny_pipeline("skyreels_v2_df")
    base = run(pipe, kwargs, causal_block_size=2)  # sets the transformer's num_frame_per_block: both runs alike
    with dit_accel.accelerate(pipe, "blocktopk", min_tokens=64) as handle:
        out = run(pipe, kwargs, causal_block_size=2)
        stats = handle.stats()
    assert torch.equal(out, base)
    assert stats["overall"]["dense_reasons"] == {"attn_mask": 3 * BRANCHES * LAYERS}
    assert stats["overall"]["sparse_calls"] == 0


def test_long_video_segments_restart_the_schedule():
    """Each segment of a long video is denoised from the first timestep again: the schedule restarts (caches
    cleared), counted in ``steps_backwards`` with one warning. Known limitation, documented."""
    pipe, kwargs = tiny_pipeline("skyreels_v2_df")
    with dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, dense_steps=1) as handle:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(pipe, kwargs, num_frames=13, base_num_frames=9, overlap_history=5)
        stats = handle.stats()
    restarts = stats["steps_backwards"]
    assert restarts >= 1
    assert sum("went back" in str(w.message) for w in caught) == 1
    # every segment keeps its own first step dense
    assert stats["overall"]["dense_reasons"] == {"dense_step": (restarts + 1) * BRANCHES * LAYERS}

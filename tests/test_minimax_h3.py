"""MiniMax-H3: one packed sequence ``[text | conditioning | target audio | target video]`` in full self-attention.

The adapter reads the target video's grid from ``position_ids`` and ``token_tags``, treats every row before it as
leading text (dense), and takes the step from the target video's timestep (one forward carries one per noise level,
and ``t = 1 - sigma`` rises). Each check here is run with the bug it exists for planted, and must fail then.
The tiny pipeline is the ``fl2va`` core denoise chain of the modular pipeline (see ``dit_accel.testing``): 8 text
rows, 56 keyframe rows, 414 audio rows, then 37 x 4 x 14 target video rows.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import dit_accel
from dit_accel.pipelines.families import _minimax_h3_target, find_family
from dit_accel.testing import tiny_pipeline

GRID = (37, 4, 14)  # 37 latent frames of 8 x 28, patch (1, 2, 2)
CONDITION_ROWS = 4 * 14  # one keyframe, anchored first


def _run(pipe, kwargs, **extra):
    return pipe(**dict(kwargs, **extra), generator=torch.Generator().manual_seed(0))


def _record_forwards(transformer, into: list[dict]):
    """A hook keeping a copy of each forward's keyword arguments (copies: the loop steps the latents in place)."""

    def record(mod, args, kw) -> None:
        into.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})

    return transformer.register_forward_pre_hook(record, with_kwargs=True)


def _first_call(pipe, kwargs, family=None, **extra) -> tuple[torch.Tensor, object, dict]:
    """q (B, H, N, D) and the layout of the first call of the first site, and the first forward's arguments
    (``family``: the adapter replaced, a planted bug)."""
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
    acc = handle.accelerators["transformer"]
    if family is not None:
        acc.family = family
    seen: list = []
    attend = acc.sites[0].attend

    def spied(q, k, v, *, state, **rest):
        seen.append((q.detach().clone(), state.layout))
        return attend(q, k, v, state=state, **rest)

    acc.sites[0].attend = spied  # this instance only
    forwards: list[dict] = []
    hook = _record_forwards(pipe.transformer, forwards)
    try:
        _run(pipe, kwargs, **extra)
    finally:
        hook.remove()
        handle.remove()
    q, layout = seen[0]
    return q, layout, forwards[0]


def _coordinate_latents() -> torch.Tensor:
    """Target latents whose channels 0, 1, 2 hold each latent's frame, row and column index."""
    frames, rows, cols = GRID[0], GRID[1] * 2, GRID[2] * 2
    latents = torch.zeros(1, 24, frames, rows, cols)
    latents[0, 0] = torch.arange(frames, dtype=torch.float32).view(-1, 1, 1)
    latents[0, 1] = torch.arange(rows, dtype=torch.float32).view(1, -1, 1)
    latents[0, 2] = torch.arange(cols, dtype=torch.float32).view(1, 1, -1)
    return latents


def _grid_is_the_patchified_target(layout, hidden_states: torch.Tensor) -> bool:
    """The layout's grid against the rows the pipeline patchified: the last f * h * w video rows must be the target
    latents in raster order (a row's channels 0, 4, 8 are its patch's top-left frame, row and column) and every
    other video row a conditioning row."""
    f, h, w = layout.grid
    if f * h * w != hidden_states.shape[1] - CONDITION_ROWS:
        return False
    rows = hidden_states[0, -f * h * w :]
    n = torch.arange(f * h * w)
    return (
        torch.equal(rows[:, 0].long(), n // (h * w))
        and torch.equal(rows[:, 4].long(), (n // w) % h * 2)
        and torch.equal(rows[:, 8].long(), n % w * 2)
    )


def test_minimax_h3_grid_is_the_patchified_target_video():
    pipe, kwargs = tiny_pipeline("minimax_h3")
    q, layout, forward = _first_call(pipe, kwargs, latents=_coordinate_latents())
    assert layout.grid == GRID and layout.grid[1] != layout.grid[2]  # not square: rows and columns differ
    assert _grid_is_the_patchified_target(layout, forward["hidden_states"])
    assert layout.total_tokens == q.shape[2] == forward["position_ids"].shape[0]


def test_minimax_h3_grid_with_rows_and_cols_swapped_fails_the_check():
    """The planted bug the check above exists for: same token count, wrong shape."""
    pipe, kwargs = tiny_pipeline("minimax_h3")
    family = find_family(pipe.transformer)

    def swapped(model, bound):
        grid = family.grid(model, bound)
        return None if grid is None else (grid[0], grid[2], grid[1])

    _, layout, forward = _first_call(
        pipe, kwargs, family=dataclasses.replace(family, grid=swapped), latents=_coordinate_latents()
    )
    assert not _grid_is_the_patchified_target(layout, forward["hidden_states"])


def _target_rows_of_the_model(pipe, kwargs, q0: torch.Tensor) -> set[int]:
    """The rows of the first site's q that move when only the target video noise changes: in the first block
    every row's q depends on its own input only, so these are exactly the target video rows."""
    other = torch.randn(1, 24, GRID[0], GRID[1] * 2, GRID[2] * 2, generator=torch.Generator().manual_seed(1))
    q1, _, _ = _first_call(pipe, kwargs, latents=other)
    changed = (q0 - q1).abs().amax(dim=(0, 1, 3)) > 1e-6  # per row, over batch, heads and channels
    return {int(i) for i in changed.nonzero().flatten()}


@pytest.mark.parametrize("planted", [False, True])
def test_minimax_h3_only_the_target_video_rows_are_video(planted):
    """Every row before the target video (text, the keyframe's rows, audio) is leading text, kept dense as query
    and key. Planted bug: counting as text only the rows not tagged video, so the keyframe's rows (tagged video)
    and the text's vision-block rows would be sparsified as if they were target video."""
    pipe, kwargs = tiny_pipeline("minimax_h3")
    # the audio noise given, so the generator draws nothing after the (given) target video noise
    kwargs = dict(kwargs, audio_latents=torch.randn(2, 32, 207, generator=torch.Generator().manual_seed(2)))
    family = find_family(pipe.transformer)
    if planted:
        family = dataclasses.replace(family, text_count=lambda bound: int((bound["token_tags"] != 0).sum()))
    latents = torch.randn(1, 24, GRID[0], GRID[1] * 2, GRID[2] * 2, generator=torch.Generator().manual_seed(0))
    q0, layout, _ = _first_call(pipe, kwargs, family=family, latents=latents)
    target = _target_rows_of_the_model(pipe, kwargs, q0)
    tokens = q0.shape[2]
    assert len(target) == GRID[0] * GRID[1] * GRID[2] and max(target) == tokens - 1
    assert layout.text_first
    assert (set(range(layout.text_tokens, tokens)) == target) is not planted


def _packed(anchors: tuple[str, ...], audio_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids and token_tags as the pipeline's own layout step builds them: 8 text rows (three tagged
    video), one keyframe block per anchor, ``audio_latents`` x 2 audio rows, then the 37 x 4 x 14 target."""
    from diffusers.modular_pipelines.minimax_h3.before_denoise import MiniMaxH3PrepareLayoutStep

    position_ids, token_tags, *_ = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
        torch.tensor([1, 1, 0, 0, 0, 1, 1, 1]), GRID[0], GRID[1] * 2, GRID[2] * 2, audio_latents, (1, 2, 2), 2, 2, 0,
        anchors,
    )  # fmt: skip
    return position_ids, token_tags


def _naive_target(position_ids: torch.Tensor, token_tags: torch.Tensor) -> tuple[int, int, int] | None:
    """The planted bug: the whole trailing run of video-tagged rows taken as the target video."""
    others = (token_tags != 0).nonzero()
    start = int(others[-1]) + 1 if others.numel() else 0
    frames = position_ids[start:, 0].unique().numel()
    run = position_ids.shape[0] - start
    return (frames, GRID[1], run // (frames * GRID[1])) if run % (frames * GRID[1]) == 0 else None


@pytest.mark.parametrize("anchors", [(), ("first",), ("last",), ("first", "last")])
@pytest.mark.parametrize("audio_latents", [207, 0])
def test_minimax_h3_target_grid_stops_at_the_conditioning(anchors, audio_latents):
    """The target video is walked back frame by frame: a keyframe block right before it (possible only without
    audio rows between, which the pipelines never build) is anchored at frame 0's time or at a later one, so the
    walk stops there. The naive reading, the whole trailing run of video rows, takes the keyframes as target
    frames whenever they touch it: the planted bug, which must fail where they do."""
    position_ids, token_tags = _packed(anchors, audio_latents)
    assert _minimax_h3_target(position_ids, token_tags) == GRID
    touching = bool(anchors) and audio_latents == 0
    assert (_naive_target(position_ids, token_tags) == GRID) is not touching


def test_minimax_h3_target_grid_refuses_a_non_raster_frame():
    """A last frame whose (h, w) ids are not the raster of its distinct rows and columns (here its rows reversed)
    is no grid this layout describes: None, so the calls stay dense (``no_layout``) rather than tiling wrongly."""
    position_ids, token_tags = _packed((), 207)
    per_frame = GRID[1] * GRID[2]
    position_ids[-per_frame:, 1] = position_ids[-per_frame:, 1].flip(0)
    assert _minimax_h3_target(position_ids, token_tags) is None


@pytest.mark.parametrize("planted", [None, "largest_timestep", "no_new_generation"])
def test_minimax_h3_steps_follow_the_target_videos_timestep(planted):
    """Two calls of 4 forwards with ``dense_steps=2``: each call is a generation of steps 0-3, read from the target
    video's timestep against the video scheduler's, so steps 0 and 1 of each stay dense. Planted bugs: the largest
    timestep of the forward (what other families use; here the keyframe's 0.999 at every step, so every forward
    reads as the last step), and a second call not starting a new generation (the modular pipeline resets no
    hooks: its step would go back, warned and counted in ``steps_backwards``)."""
    pipe, kwargs = tiny_pipeline("minimax_h3")
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64, dense_steps=2)
    acc = handle.accelerators["transformer"]
    if planted == "largest_timestep":
        acc.family = dataclasses.replace(acc.family, step_timestep=None)
    if planted == "no_new_generation":
        acc.tracker.new_timesteps_new_generation = False
    steps = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                _run(pipe, kwargs, num_inference_steps=5)
                steps.append(acc.steps)
        stats = handle.stats()
    finally:
        handle.remove()
    went_back = sum("went back" in str(w.message) for w in caught)
    right = (
        steps == [(0, 1, 2, 3)] * 2
        and stats["overall"]["dense_reasons"] == {"dense_step": 2 * 2 * 2}  # calls x dense steps x sites
        and stats["overall"]["sparse_calls"] == 2 * 2 * 2
        and stats["steps_backwards"] == 0
        and went_back == 0
    )
    assert right is (planted is None), (steps, stats["overall"]["dense_reasons"], stats["steps_backwards"])


def _first_forward(pipe, kwargs) -> dict:
    forwards: list[dict] = []
    hook = _record_forwards(pipe.transformer, forwards)
    try:
        _run(pipe, kwargs)
    finally:
        hook.remove()
    return forwards[0]


@pytest.mark.parametrize("planted", [False, True])
def test_minimax_h3_bare_transformer_counts_rising_timesteps(planted):
    """A bare transformer (``num_steps=``, no scheduler) counts distinct timesteps; MiniMax-H3's rise as it
    denoises (t = 1 - sigma), so a drop starts a new generation. Planted bug: the falling rule other families
    use, under which every forward would start a generation at step 0 and nothing would run sparse."""
    pipe, kwargs = tiny_pipeline("minimax_h3")
    forward = _first_forward(pipe, kwargs)
    target = int(forward["timestep_indices"][-1])
    transformer = pipe.transformer
    handle = dit_accel.accelerate(transformer, "blocktopk", min_tokens=64, num_steps=4, dense_steps=1)
    acc = handle.accelerators["transformer"]
    if planted:
        acc.tracker.timestep_rises = False
    try:
        for t in (0.0, 0.3, 0.6, 0.9, 0.0, 0.3):  # one generation of 4 steps, then a second one
            timestep = forward["timestep"].clone()
            timestep[target] = t
            transformer(**dict(forward, timestep=timestep))
        stats = handle.stats()
        generation = acc.tracker.state.generation
    finally:
        handle.remove()
    right = (
        generation == 1
        and acc.steps == (0, 1)
        and stats["overall"]["dense_reasons"] == {"dense_step": 2 * 2}  # generations x sites
        and stats["overall"]["sparse_calls"] == 4 * 2
    )
    assert right is not planted, (generation, acc.steps, stats["overall"]["dense_reasons"])


def test_minimax_h3_target_grid_of_a_ref2va_layout():
    """The ``ref2va`` layout, ``[text | references | target audio | target video]``, from the pipeline's own builder:
    an image and a video reference on the target's own frame grid (the case a grid read could mistake for target
    frames), the video's soundtrack and an audio reference. The target is the trailing 37 x 4 x 14 rows."""
    from types import SimpleNamespace

    from diffusers.modular_pipelines.minimax_h3.before_denoise import MiniMaxH3Ref2VAPrepareLayoutStep

    references = [
        SimpleNamespace(kind="image", has_audio=False),
        SimpleNamespace(kind="video", has_audio=True),
        SimpleNamespace(kind="audio", has_audio=True),
    ]
    visual = [torch.zeros(1, 24, 1, GRID[1] * 2, GRID[2] * 2), torch.zeros(1, 24, 7, GRID[1] * 2, GRID[2] * 2)]
    audio = [torch.zeros(2 * 50, 32), torch.zeros(2 * 30, 32)]
    position_ids, token_tags, video_indices, *_ = MiniMaxH3Ref2VAPrepareLayoutStep.build_ref2va_packed_sequence(
        torch.tensor([1, 1, 0, 0, 0, 1, 1, 1]), references, visual, audio, GRID[0], GRID[1] * 2, GRID[2] * 2, 207,
        (1, 2, 2), 2, 2, 0,
    )  # fmt: skip
    target = GRID[0] * GRID[1] * GRID[2]
    assert torch.equal(video_indices[-target:], torch.arange(position_ids.shape[0] - target, position_ids.shape[0]))
    assert _minimax_h3_target(position_ids, token_tags) == GRID

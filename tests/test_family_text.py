"""Where each joint-attention family puts its text tokens, found from the model itself, against the layout.

The text rows of a self-attention call are found without the family table: the pipeline runs twice with the same
noise and different prompt embeddings, and in the first joint block the rows of q that change are the text
tokens (video tokens have not met the text yet; pooled embeddings, which condition every token, are kept). The
layout the family adapter gives that call must name exactly those rows, so a family whose text side is flipped,
or whose text count is wrong, fails here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dit_accel
from dit_accel.testing import tiny_pipeline

JOINT = ("cogvideox", "hunyuan_video", "flux", "flux2")


def _first_call(pipe, kwargs, flip: bool = False, seed: int = 0) -> tuple[torch.Tensor, object]:
    """q (B, H, N, D) and the layout of the first call of the first self-attention site (``flip``: with the
    family adapter's text side planted the wrong way round; ``seed``: of the noise)."""
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
    acc = handle.accelerators["transformer"]
    if flip:
        acc.family = dataclasses.replace(acc.family, text_first=not acc.family.text_first)
    site = acc.sites[0]
    seen: list[tuple[torch.Tensor, object]] = []
    attend = site.attend

    def spied(q, k, v, *, state, **rest):
        seen.append((q.detach().clone(), state.layout))
        return attend(q, k, v, state=state, **rest)

    site.attend = spied  # this instance only
    try:
        pipe(**dict(kwargs, num_inference_steps=1), generator=torch.Generator().manual_seed(seed))
    finally:
        handle.remove()
    return seen[0]


def _text_rows(layout, tokens: int) -> set[int]:
    n = layout.text_tokens
    return set(range(n)) if layout.text_first else set(range(tokens - n, tokens))


def _text_rows_of_the_model(pipe, kwargs, q0: torch.Tensor) -> set[int]:
    other = dict(kwargs, prompt_embeds=kwargs["prompt_embeds"] + torch.randn_like(kwargs["prompt_embeds"]))
    q1, _ = _first_call(pipe, other)
    changed = (q0 - q1).abs().amax(dim=(0, 1, 3)) > 1e-6  # per token, over batch, heads and channels
    return {int(i) for i in changed.nonzero().flatten()}


@pytest.mark.parametrize("family", JOINT)
def test_layout_names_the_rows_that_carry_text(family):
    pipe, kwargs = tiny_pipeline(family)
    q0, layout = _first_call(pipe, kwargs)
    text = _text_rows_of_the_model(pipe, kwargs, q0)
    tokens = q0.shape[2]
    assert layout is not None and 0 < len(text) < tokens, (layout, len(text), tokens)
    assert layout.text_tokens == len(text)
    assert _text_rows(layout, tokens) == text, (family, layout.text_first, sorted(text)[:3], sorted(text)[-3:])
    assert layout.grid[0] * layout.grid[1] * layout.grid[2] == tokens - len(text)


@pytest.mark.parametrize("family", JOINT)
def test_a_family_with_its_text_side_flipped_fails_the_check(family):
    """The planted bug the check above exists for: the adapter's text side flipped names rows the model does not
    put text in."""
    pipe, kwargs = tiny_pipeline(family)
    q0, layout = _first_call(pipe, kwargs, flip=True)
    assert _text_rows(layout, q0.shape[2]) != _text_rows_of_the_model(pipe, kwargs, q0)


def _mochi_calls(pipe, kwargs, seed: int, flip: bool = False) -> list[tuple[torch.Tensor, object]]:
    """q and the per-call layout of the calls of the first site in the first forward of a Mochi run (one call
    per sample; two steps, as Mochi's sigma schedule needs)."""
    handle = dit_accel.accelerate(pipe, "blocktopk", min_tokens=64)
    acc = handle.accelerators["transformer"]
    if flip:
        acc.family = dataclasses.replace(acc.family, text_first=not acc.family.text_first)
    site = acc.sites[0]
    seen: list[tuple[torch.Tensor, object]] = []
    attend = site.attend

    def spied(q, k, v, *, state, **rest):
        layout = state.layout.for_tokens(q.shape[-2]) if state.layout is not None else None
        seen.append((q.detach().clone(), layout))
        return attend(q, k, v, state=state, **rest)

    site.attend = spied  # this instance only
    try:
        pipe(**dict(kwargs, num_inference_steps=2), generator=torch.Generator().manual_seed(seed))
    finally:
        handle.remove()
    return seen[:2]


@pytest.mark.parametrize("flip", [False, True])
def test_mochi_names_each_samples_text_rows(flip):
    """Mochi drops each sample's padded prompt tokens and calls SDPA once per sample, so the negative prompt's
    call holds 3 text rows and the prompt's 11. Here the text rows are found as the rows of q that do not move
    when the noise changes (Mochi's timestep embedding pools the text, so every row moves with the prompt); the
    layout of each call must name exactly them, and with the text side planted the wrong way round it must not."""
    pipe, kwargs = tiny_pipeline("mochi")
    first = _mochi_calls(pipe, kwargs, seed=0, flip=flip)
    other = _mochi_calls(pipe, kwargs, seed=1)
    assert len(first) == len(other) == 2  # classifier-free guidance: negative, then positive sample
    video = 3 * 16 * 16
    for (q0, layout), (q1, _), real in zip(first, other, (3, 11)):
        assert q0.shape[2] == video + real
        unchanged = (q0 - q1).abs().amax(dim=(0, 1, 3)) <= 1e-6
        text = {int(i) for i in unchanged.nonzero().flatten()}
        assert len(text) == real
        assert layout is not None and layout.text_tokens == real
        assert (_text_rows(layout, q0.shape[2]) == text) is not flip


@pytest.mark.parametrize("flip", [False, True])
def test_hunyuan15_layout_names_the_rows_the_noise_does_not_move(flip):
    """HunyuanVideo 1.5 puts 753 text rows after the video: 729 image tokens (masked in text-to-video), 8 ByT5 and
    16 MLLM tokens, padded ones included (its mask hides them). A changed prompt moves only the real MLLM rows, so
    here the text rows are the rows of q the noise does not move; the layout must name exactly them, and with its
    text side planted the wrong way round it must not."""
    pipe, kwargs = tiny_pipeline("hunyuan_video15")
    q0, layout = _first_call(pipe, kwargs, flip=flip)
    q1, _ = _first_call(pipe, kwargs, seed=1)
    unchanged = (q0 - q1).abs().amax(dim=(0, 1, 3)) <= 1e-6
    text = {int(i) for i in unchanged.nonzero().flatten()}
    assert len(text) == 729 + 8 + 16 and layout.text_tokens == len(text)
    assert layout.grid[0] * layout.grid[1] * layout.grid[2] == q0.shape[2] - len(text)
    assert (_text_rows(layout, q0.shape[2]) == text) is not flip

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


def _first_call(pipe, kwargs, flip: bool = False) -> tuple[torch.Tensor, object]:
    """q (B, H, N, D) and the layout of the first call of the first self-attention site (``flip``: with the
    family adapter's text side planted the wrong way round)."""
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
        pipe(**dict(kwargs, num_inference_steps=1), generator=torch.Generator().manual_seed(0))
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

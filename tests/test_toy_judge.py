"""The toy judge reads shape and background from pixels: on data clips (whose captions are true) it must agree with
the caption, and a planted confusion (a prototype moved, a ring's hole ignored) must break that."""

from __future__ import annotations

import itertools

import numpy as np

from dit_accel.toy import judge
from dit_accel.toy.data import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, render, scene_from_prompt_parts


def _clips(size: tuple[int, int, int]):
    for seed, (c, s, d, b) in itertools.product(
        range(2), itertools.product(list(COLORS)[:2], SHAPES, DIRECTIONS[:2], BACKGROUNDS)
    ):
        yield c, s, b, render(scene_from_prompt_parts(c, s, d, b, seed, *size))


def test_judge_reads_data_clips_like_their_captions():
    clips = list(_clips((8, 32, 32)))
    shape_ok = np.mean([judge.video_shape(v, c) == s for c, s, _, v in clips])
    background_ok = np.mean([judge.video_background(v, c) == b for c, _, b, v in clips])
    assert shape_ok >= 0.97, shape_ok
    assert background_ok >= 0.97, background_ok


def test_every_shape_and_background_is_reachable():
    # A judge that always answers the majority class would pass a loose rate: every class must be read somewhere.
    clips = list(_clips((8, 32, 32)))
    assert {judge.video_shape(v, c) for c, *_, v in clips} == set(SHAPES)
    assert {judge.video_background(v, c) for c, *_, v in clips} == set(BACKGROUNDS)


def test_fill_holes_fills_only_enclosed_regions():
    m = np.zeros((7, 7), bool)
    m[1:6, 1:6] = True
    m[3, 3] = False  # enclosed hole
    m[0:3, 6] = False
    filled = judge.fill_holes(m)
    assert filled[3, 3] and not filled[0, 0] and filled.sum() == 25


def test_noise_on_a_plain_background_is_plain_and_no_object_gives_none():
    rng = np.random.default_rng(0)
    frame = np.full((32, 32, 3), 0.3) + rng.normal(0, 0.004, (32, 32, 1))
    assert judge.frame_background(frame, np.zeros((32, 32), bool)) == "plain"
    assert judge.frame_shape(np.zeros((32, 32), bool)) is None

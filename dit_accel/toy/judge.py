"""What a toy render shows, measured without a trained classifier: the object's shape from its silhouette and the
background's kind from the pixels around it.

Shape. The object is segmented by its colour (:func:`dit_accel.toy.data.segment_color`); in each frame its holes are
filled and two numbers are read: the **hole share** (pixels inside the filled silhouette that are not the object: a
ring has about 0.16, solid shapes 0) and the **reach** (how far the silhouette extends from its centroid, the mean of
its 3 farthest pixels, over the square root of its filled area). Reach is scale-free and rotation-free: a disc has
1/sqrt(pi) = 0.56, a square sqrt(2)/2 = 0.71, an equilateral triangle 2/sqrt(3 sqrt(3)) = 0.88. A frame reads as a
ring when its hole share is at least 0.06, else as the shape whose reach is nearest; the clip's shape is the vote of
its frames. The thresholds come from this geometry, and ``tests/test_toy_judge.py`` checks them on data clips.

Background. The object (dilated by two pixels) is masked out and the luminance of the rest is compared with four
models fitted by least squares: a constant (plain), a plane in x and y (gradient), a value per column or per row
(vertical or horizontal stripes); texture that none of them explains is a checkerboard when it is as strong as
the weakest pair of background tones makes one, else noise on a plain background. The kind is the simplest model
that leaves under 15% of the variance unexplained.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .data import segment_color

REACH = {"circle": 1 / math.sqrt(math.pi), "square": math.sqrt(2) / 2, "triangle": 2 / math.sqrt(3 * math.sqrt(3))}
RING_HOLE_SHARE = 0.06
MIN_PIXELS = 12


def _grow(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel in the four axis directions."""
    grown = mask.copy()
    grown[1:, :] |= mask[:-1, :]
    grown[:-1, :] |= mask[1:, :]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every region not connected to the border (4-connectivity) switched on."""
    outside = np.zeros_like(mask)
    free = ~mask
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = free[0, :], free[-1, :], free[:, 0], free[:, -1]
    while True:
        grown = _grow(outside) & free
        if (grown == outside).all():
            return ~outside
        outside = grown


def frame_shape(mask: np.ndarray) -> str | None:
    """The shape one frame's object mask looks like (None when the object is too small to tell)."""
    if mask.sum() < MIN_PIXELS:
        return None
    filled = fill_holes(mask)
    area = float(filled.sum())
    if 1.0 - mask.sum() / area >= RING_HOLE_SHARE:
        return "ring"
    ys, xs = np.nonzero(filled)
    cx, cy = xs.mean(), ys.mean()
    dist = np.sort(np.hypot(xs - cx, ys - cy))
    # Pixel centres sit half a pixel inside the true outline: add it back before comparing with the geometry.
    reach = (dist[-3:].mean() + 0.5) / math.sqrt(area)
    return min(REACH, key=lambda s: abs(REACH[s] - reach))


def video_shape(video: np.ndarray, color: str) -> str | None:
    """Vote of the frames' shapes for the object of ``color`` in ``video`` (F, H, W, 3) in [0, 1]."""
    votes = Counter(s for m in segment_color(video, color) if (s := frame_shape(m)) is not None)
    return votes.most_common(1)[0][0] if votes else None


def frame_background(frame: np.ndarray, object_mask: np.ndarray, unexplained: float = 0.15) -> str:
    """The background kind of one frame (H, W, 3) around ``object_mask``: plain, gradient, striped or checkered."""
    keep = ~_grow(_grow(object_mask))
    lum = frame.mean(-1)
    ys, xs = np.nonzero(keep)
    v = lum[keep]
    total = float(((v - v.mean()) ** 2).sum())
    std = math.sqrt(total / max(len(v), 1))
    if std < 0.006:  # the closest two background tones differ by 0.037: nothing visible
        return "plain"

    def residual(design: np.ndarray) -> float:
        coef, *_ = np.linalg.lstsq(design, v, rcond=None)
        return float(((v - design @ coef) ** 2).sum()) / total

    ones = np.ones_like(v)
    if residual(np.stack([ones, xs, ys], 1)) < unexplained:
        return "gradient"
    cols = np.eye(frame.shape[1])[xs]
    rows = np.eye(frame.shape[0])[ys]
    if min(residual(cols), residual(rows)) < unexplained:
        return "striped"
    # Texture no simple model explains: a checkerboard if it is as strong as the weakest tone pair makes it (std
    # 0.0185), else noise on a flat background.
    return "checkered" if std > 0.012 else "plain"


def video_background(video: np.ndarray, color: str) -> str:
    """Vote of the frames' background kinds around the object of ``color``."""
    masks = segment_color(video, color)
    votes = Counter(frame_background(f, m) for f, m in zip(video, masks))
    return votes.most_common(1)[0][0]


__all__ = ["REACH", "fill_holes", "frame_background", "frame_shape", "video_background", "video_shape"]

"""Procedural captioned videos for the toy model: shapes that move, grow or spin over simple backgrounds.

Everything is defined in pixel units (object radius, speed in px/frame) so that a clip rendered at 32x32 and one at
64x64 have objects of the same size in tokens; that is what lets training spend most steps at a low resolution and
still render well at the full one. Every sample is a pure function of ``(seed, index)`` and its caption describes
exactly what is drawn (tests segment the colour and track the centroid).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.14),
    "green": (0.16, 0.84, 0.22),
    "blue": (0.18, 0.34, 1.00),
    "yellow": (0.96, 0.90, 0.14),
    "cyan": (0.14, 0.86, 0.90),
    "magenta": (0.90, 0.18, 0.86),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
MOTIONS: tuple[str, ...] = DIRECTIONS + ("curve", "grows", "rotates")
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "striped", "checkered")
# Muted, near-grey tones: saturation stays far below the object palette, so colour segmentation is trivial.
BG_TONES: tuple[tuple[float, float, float], ...] = (
    (0.10, 0.10, 0.12),
    (0.16, 0.15, 0.14),
    (0.22, 0.22, 0.24),
    (0.30, 0.29, 0.28),
    (0.38, 0.38, 0.40),
    (0.46, 0.45, 0.44),
)
#: ``background_variety="fixed"``: one look per background word (tones, gradient direction, stripe orientation and
#: period, checker cell), so a frame's background follows from its prompt and each pixel's position alone.
FIXED_BG_TONES: tuple[tuple[float, float, float], tuple[float, float, float]] = (BG_TONES[1], BG_TONES[4])
FIXED_BG_PARAMS: dict[str, tuple[float, ...]] = {
    "plain": (),
    "gradient": (1.0, 0.0),
    "striped": (1.0, 8.0),
    "checkered": (8.0,),
}
BACKGROUND_VARIETIES: tuple[str, ...] = ("random", "fixed")
# Unit vectors in image coordinates (x right, y down).
DIR_VEC: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
_ROTATABLE = ("square", "triangle")

# (colour, shape, direction) triples that never appear in training, so evaluation measures composition, not recall.
# Each colour and each direction keeps its other shapes in training; each shape is held out three times.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "square", "left"),
        ("red", "ring", "down"),
        ("green", "circle", "right"),
        ("green", "triangle", "up"),
        ("blue", "triangle", "left"),
        ("blue", "square", "down"),
        ("yellow", "ring", "up"),
        ("yellow", "circle", "left"),
        ("cyan", "square", "right"),
        ("cyan", "ring", "left"),
        ("magenta", "triangle", "down"),
        ("magenta", "circle", "up"),
    }
)


@dataclass(frozen=True)
class ObjectSpec:
    """One object: what it is, how it moves, and its frame-space trajectory parameters."""

    color: str
    shape: str
    motion: str
    x0: float
    y0: float
    radius: float
    speed: float = 0.0  # px/frame for linear motion, rad/frame for curve and rotation
    angle0: float = 0.0
    arc_radius: float = 0.0  # curve: radius of the circular path
    arc_cx: float = 0.0
    arc_cy: float = 0.0
    growth: float = 1.0  # grows: final radius / initial radius

    def state(self, t: int, frames: int) -> tuple[float, float, float, float]:
        """World position, radius and rotation angle at frame ``t`` (world equals frame at ``t = 0``)."""
        x, y, r, a = self.x0, self.y0, self.radius, self.angle0
        if self.motion in DIR_VEC:
            dx, dy = DIR_VEC[self.motion]
            x, y = x + dx * self.speed * t, y + dy * self.speed * t
        elif self.motion == "curve":
            phi = self.angle0 + self.speed * t
            x, y = self.arc_cx + self.arc_radius * math.cos(phi), self.arc_cy + self.arc_radius * math.sin(phi)
            a = 0.0
        elif self.motion == "grows":
            r = self.radius * (1.0 + (self.growth - 1.0) * t / max(frames - 1, 1))
        elif self.motion == "rotates":
            a = self.angle0 + self.speed * t
        return x, y, r, a


@dataclass(frozen=True)
class SceneSpec:
    """A whole clip: size, background, camera pan and objects (back to front)."""

    frames: int
    height: int
    width: int
    background: str
    bg_colors: tuple[tuple[float, float, float], tuple[float, float, float]]
    bg_param: tuple[float, ...]  # gradient: (dx, dy); striped: (vertical, period); checkered: (cell,)
    pan: str | None
    pan_speed: float
    objects: tuple[ObjectSpec, ...] = field(default_factory=tuple)

    def camera_offset(self, t: int) -> tuple[float, float]:
        """Camera position at frame ``t`` (the view moves this way, so content moves the other way)."""
        if self.pan is None:
            return 0.0, 0.0
        dx, dy = DIR_VEC[self.pan]
        return dx * self.pan_speed * t, dy * self.pan_speed * t


def caption(scene: SceneSpec) -> str:
    """The sentence for a scene, from the fixed vocabulary in :data:`dit_accel.toy.text.VOCAB`."""
    parts = []
    for obj in scene.objects:
        if obj.motion in DIR_VEC:
            verb = f"moves {obj.motion}"
        elif obj.motion == "curve":
            verb = "moves along a curve"
        else:
            verb = obj.motion
        parts.append(f"a {obj.color} {obj.shape} {verb}")
    text = " and ".join(parts) + f" over a {scene.background} background"
    if scene.pan is not None:
        text += f" while the camera pans {scene.pan}"
    return text


def _place_linear(rng: np.random.Generator, lo: float, hi: float, travel: float) -> float:
    """Start coordinate so that start and start + travel both stay in [lo, hi]."""
    a, b = lo - min(travel, 0.0), hi - max(travel, 0.0)
    return float(rng.uniform(a, b)) if b > a else 0.5 * (lo + hi) - 0.5 * travel


def _sample_object(
    rng: np.random.Generator,
    scene_frames: int,
    height: int,
    width: int,
    pan_vec: tuple[float, float],
    color: str,
    allow_held_out: bool,
    motion_probs: np.ndarray | None = None,
    speed_range: tuple[float, float] = (1.5, 2.5),
) -> ObjectSpec:
    """Draw one object whose whole frame-space trajectory stays inside the canvas (``motion_probs``: one
    probability per :data:`MOTIONS` entry, None for uniform)."""
    while True:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if motion_probs is None:
            motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        else:
            motion = MOTIONS[int(rng.choice(len(MOTIONS), p=motion_probs))]
        if motion == "rotates" and shape not in _ROTATABLE:
            continue
        if not allow_held_out and (color, shape, motion) in HELD_OUT:
            continue
        break
    steps = max(scene_frames - 1, 1)
    radius = float(rng.uniform(6.0, 9.0))
    margin = radius + 1.0
    px, py = pan_vec  # content drift in frame space per frame, opposite to the camera motion
    if motion in DIR_VEC:
        dx, dy = DIR_VEC[motion]
        room = (width if dx else height) - 2 * margin
        speed = float(min(rng.uniform(*speed_range), max(room, 0.0) / steps))
        speed = max(speed, 0.8)
        tx, ty = (dx * speed + px) * steps, (dy * speed + py) * steps
        x0 = _place_linear(rng, margin, width - margin, tx)
        y0 = _place_linear(rng, margin, height - margin, ty)
        return ObjectSpec(color, shape, motion, x0, y0, radius, speed=speed, angle0=float(rng.uniform(0, 2 * math.pi)))
    if motion == "curve":
        arc = float(rng.uniform(0.25, 0.4) * min(height, width))
        arc = min(arc, 0.5 * min(height, width) - margin)
        sweep = float(rng.uniform(0.5, 0.8) * math.pi)
        speed = sweep / steps * (1.0 if rng.random() < 0.5 else -1.0)
        cx, cy = 0.5 * width, 0.5 * height
        # Pan drift is folded into the arc centre's start so the trajectory stays in frame on small canvases.
        return ObjectSpec(
            color,
            shape,
            motion,
            cx,
            cy,
            radius * 0.85,
            speed=speed,
            angle0=float(rng.uniform(0, 2 * math.pi)),
            arc_radius=max(arc, 2.0),
            arc_cx=cx - px * steps / 2,
            arc_cy=cy - py * steps / 2,
        )
    if motion == "grows":
        r0 = radius * 0.6
        growth = float(rng.uniform(1.6, 1.9))
        m = r0 * growth + 1.0
        x0 = _place_linear(rng, m, width - m, px * steps)
        y0 = _place_linear(rng, m, height - m, py * steps)
        return ObjectSpec(color, shape, motion, x0, y0, r0, growth=growth)
    # rotates
    x0 = _place_linear(rng, margin, width - margin, px * steps)
    y0 = _place_linear(rng, margin, height - margin, py * steps)
    spin = float(rng.uniform(0.15, 0.3)) * (1.0 if rng.random() < 0.5 else -1.0)
    return ObjectSpec(color, shape, motion, x0, y0, radius, speed=spin, angle0=float(rng.uniform(0, 2 * math.pi)))


def sample_scene(
    rng: np.random.Generator,
    frames: int,
    height: int,
    width: int,
    two_object_prob: float = 0.25,
    pan_prob: float = 0.15,
    allow_held_out: bool = False,
    motion_weights: Sequence[float] | None = None,
    speed_range: tuple[float, float] = (1.5, 2.5),
    background_variety: str = "random",
) -> SceneSpec:
    """Draw a random scene; held-out (colour, shape, direction) triples are excluded unless asked for.

    ``motion_weights`` (one weight per entry of :data:`MOTIONS`, default uniform) and ``speed_range`` (px/frame of
    linear motion, capped so the path fits the canvas) set how much of the data carries a direction signal.
    ``background_variety="fixed"`` draws every background word with one look (:data:`FIXED_BG_PARAMS`): the tones,
    period and orientation the prompt does not name then need no agreement across the frame, which a small model
    can only reach through nearly uniform attention. The random draws are made either way, so both varieties
    place the same objects."""
    if background_variety not in BACKGROUND_VARIETIES:
        raise ValueError(f"background_variety={background_variety!r}: expected one of {BACKGROUND_VARIETIES}")
    if motion_weights is not None and (
        len(motion_weights) != len(MOTIONS) or min(motion_weights) < 0 or sum(motion_weights) <= 0
    ):
        raise ValueError(
            f"motion_weights={motion_weights!r}: expected {len(MOTIONS)} non-negative weights for {MOTIONS}, not all 0"
        )
    probs = None if motion_weights is None else np.asarray(motion_weights, dtype=np.float64) / sum(motion_weights)
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    i, j = rng.choice(len(BG_TONES), size=2, replace=False)
    bg_colors = (BG_TONES[int(i)], BG_TONES[int(j)])
    if background == "gradient":
        ang = float(rng.uniform(0, 2 * math.pi))
        bg_param: tuple[float, ...] = (math.cos(ang), math.sin(ang))
    elif background == "striped":
        bg_param = (float(rng.random() < 0.5), float(rng.choice([6, 8, 10])))
    elif background == "checkered":
        bg_param = (float(rng.choice([6, 8])),)
    else:
        bg_param = ()
    if background_variety == "fixed":
        bg_colors, bg_param = FIXED_BG_TONES, FIXED_BG_PARAMS[background]
    pan = None
    pan_speed = 0.0
    if background in ("striped", "checkered") and rng.random() < pan_prob:
        pan = DIRECTIONS[int(rng.integers(4))]
        pan_speed = 1.0
    pan_vec = (0.0, 0.0) if pan is None else (-DIR_VEC[pan][0] * pan_speed, -DIR_VEC[pan][1] * pan_speed)
    n_obj = 2 if rng.random() < two_object_prob else 1
    colors = rng.choice(len(COLORS), size=n_obj, replace=False)
    names = list(COLORS)
    objects = tuple(
        _sample_object(rng, frames, height, width, pan_vec, names[int(c)], allow_held_out, probs, speed_range)
        for c in colors
    )
    return SceneSpec(frames, height, width, background, bg_colors, bg_param, pan, pan_speed, objects)


def scene_from_prompt_parts(
    color: str,
    shape: str,
    motion: str,
    background: str,
    seed: int,
    frames: int = 16,
    height: int = 64,
    width: int = 64,
) -> SceneSpec:
    """A single-object scene with the given words (used to build evaluation references)."""
    rng = np.random.default_rng(_stable_seed(seed, color, shape, motion, background))
    for _ in range(1000):
        scene = sample_scene(rng, frames, height, width, two_object_prob=0.0, pan_prob=0.0, allow_held_out=True)
        obj = scene.objects[0]
        if scene.background == background and (obj.shape, obj.motion) == (shape, motion):
            return SceneSpec(
                frames, height, width, background, scene.bg_colors, scene.bg_param, None, 0.0, (_recolor(obj, color),)
            )
    raise ValueError(f"could not sample shape={shape!r} motion={motion!r} background={background!r}")


def _recolor(obj: ObjectSpec, color: str) -> ObjectSpec:
    return ObjectSpec(**{**obj.__dict__, "color": color})


def _stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor moved to ``device`` without making the host wait: a pageable host-to-GPU copy waits for all
    work queued on the stream, so on CUDA the tensor is pinned and copied non-blocking."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


_SHAPE_ID = {name: i for i, name in enumerate(SHAPES)}
_BACKGROUND_ID = {name: i for i, name in enumerate(BACKGROUNDS)}


def _scene_params(scenes: Sequence[SceneSpec]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-scene background and per-(scene, frame, object) state as float64 tables, cast to float32 once on the
    device. Background ``p``: gradient (dx, dy, half extent), striped (vertical, half period, 1), checkered (0, cell,
    1), plain (0, 1, 1); object slots a scene does not use have ``on`` = 0."""
    b, f = len(scenes), scenes[0].frames
    n_obj = max(len(s.objects) for s in scenes)
    bg = {k: np.zeros((b,) + shape) for k, shape in (("kind", ()), ("c0", (3,)), ("c1", (3,)), ("p", (3,)))}
    ob = {k: np.zeros((b, f, n_obj) + shape) for k, shape in (
        ("x", ()), ("y", ()), ("r", ()), ("cos", ()), ("sin", ()), ("shape", ()), ("color", (3,)), ("on", ()),
    )}  # fmt: skip
    cam = np.zeros((b, f, 2))
    for i, scene in enumerate(scenes):
        if (scene.frames, scene.height, scene.width) != (f, scenes[0].height, scenes[0].width):
            raise ValueError("render_batch: every scene must have the same frames, height and width")
        bg["kind"][i] = _BACKGROUND_ID[scene.background]
        bg["c0"][i], bg["c1"][i] = scene.bg_colors
        if scene.background == "gradient":
            dx, dy = scene.bg_param
            bg["p"][i] = (dx, dy, 0.5 * (abs(dx) * scene.width + abs(dy) * scene.height))
        elif scene.background == "striped":
            bg["p"][i] = (scene.bg_param[0], scene.bg_param[1] / 2, 1.0)
        elif scene.background == "checkered":
            bg["p"][i] = (0.0, scene.bg_param[0], 1.0)
        else:
            bg["p"][i] = (0.0, 1.0, 1.0)
        for t in range(f):
            ox, oy = scene.camera_offset(t)
            cam[i, t] = ox, oy
            for j, obj in enumerate(scene.objects):
                x, y, r, a = obj.state(t, f)
                ob["x"][i, t, j], ob["y"][i, t, j], ob["r"][i, t, j] = x - ox, y - oy, r
                ob["cos"][i, t, j], ob["sin"][i, t, j] = math.cos(a), math.sin(a)
                ob["shape"][i, t, j] = _SHAPE_ID[obj.shape]
                ob["color"][i, t, j] = COLORS[obj.color]
                ob["on"][i, t, j] = 1.0
    bg["cam"] = cam
    return bg, ob


def _shape_sdf(shape: torch.Tensor, px: torch.Tensor, py: torch.Tensor, r, cos, sin) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of each object's shape (``shape`` holds :data:`SHAPES` indices),
    centred at the origin; every parameter broadcasts against the pixel offsets ``px``, ``py``."""
    radial = torch.hypot(px, py)
    lx, ly = cos * px + sin * py, -sin * px + cos * py
    tri = None
    for k in range(3):
        phi = math.pi / 2 + 2 * math.pi * k / 3
        e = lx * math.cos(phi) + ly * math.sin(phi) - 0.5 * r
        tri = e if tri is None else torch.maximum(tri, e)
    sdf = {
        "circle": radial - r,
        "ring": (radial - 0.7 * r).abs() - 0.3 * r,
        "square": torch.maximum(lx.abs(), ly.abs()) - 0.82 * r,
        "triangle": tri,
    }
    out = sdf["circle"]
    for name in SHAPES[1:]:
        out = torch.where(shape == _SHAPE_ID[name], sdf[name], out)
    return out


def _background(kind: torch.Tensor, p: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, height: int, width: int):
    """Blend weight toward the second background tone, per pixel, for each scene's background kind."""
    gradient = torch.clamp(0.5 + 0.5 * ((xs - width / 2) * p[0] + (ys - height / 2) * p[1]) / p[2], 0.0, 1.0)
    stripe_coord = torch.where(p[0] > 0, xs, ys)
    striped = torch.remainder(torch.floor(stripe_coord / p[1]), 2)
    checkered = torch.remainder(torch.floor(xs / p[1]) + torch.floor(ys / p[1]), 2)
    w = torch.zeros_like(gradient)
    for name, value in (("gradient", gradient), ("striped", striped), ("checkered", checkered)):
        w = torch.where(kind == _BACKGROUND_ID[name], value, w)
    return w


def render_batch(scenes: Sequence[SceneSpec], device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw same-sized scenes at once on ``device``: float32 ``(B, frames, H, W, 3)`` in [0, 1], anti-aliased via
    signed distances. Vectorised over scenes, frames and objects so a GPU trainer draws its batch where it trains."""
    if not scenes:
        raise ValueError("render_batch: scenes is empty")
    bg, ob = _scene_params(scenes)
    h, w = scenes[0].height, scenes[0].width
    b, f, n_obj = ob["x"].shape
    # All tables travel in one copy (pinned and non-blocking on CUDA) and become float32 on the device.
    tables = {**{"bg_" + k: v for k, v in bg.items()}, **{"ob_" + k: v for k, v in ob.items()}}
    flat = to_device(torch.from_numpy(np.concatenate([v.ravel() for v in tables.values()])), device).float()
    t, offset = {}, 0
    for name, v in tables.items():
        t[name], offset = flat[offset : offset + v.size].view(v.shape), offset + v.size

    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device) + 0.5,
        torch.arange(w, dtype=torch.float32, device=device) + 0.5,
        indexing="ij",
    )
    cam = t["bg_cam"]
    wx, wy = xs + cam[..., 0, None, None], ys + cam[..., 1, None, None]  # (B, F, H, W) world coordinates
    p = t["bg_p"].T.reshape(3, b, 1, 1, 1)
    weight = _background(t["bg_kind"].reshape(b, 1, 1, 1), p, wx, wy, h, w)[..., None]
    c0, c1 = (t[k].reshape(b, 1, 1, 1, 3) for k in ("bg_c0", "bg_c1"))
    frame = (1 - weight) * c0 + weight * c1
    for j in range(n_obj):  # back to front
        x, y, r, cos, sin, shape, on = (
            t["ob_" + k][:, :, j, None, None] for k in ("x", "y", "r", "cos", "sin", "shape", "on")
        )
        sdf = _shape_sdf(shape, xs - x, ys - y, r, cos, sin)
        alpha = (torch.clamp(0.5 - sdf, 0.0, 1.0) * on)[..., None]
        frame = frame * (1 - alpha) + alpha * t["ob_color"][:, :, j, None, None, :]
    return frame


def render(scene: SceneSpec) -> np.ndarray:
    """Render one scene to float32 ``(frames, height, width, 3)`` in [0, 1] (see :func:`render_batch`)."""
    return render_batch([scene])[0].numpy()


def sample_batch(
    seed: int, start: int, batch: int, frames: int, height: int, width: int, **kwargs: float
) -> list[SceneSpec]:
    """Scenes ``start .. start + batch - 1`` of the stream defined by ``seed`` (cheap: no pixels drawn)."""
    return [
        sample_scene(np.random.default_rng([seed, start + i, frames, height, width]), frames, height, width, **kwargs)
        for i in range(batch)
    ]


def make_sample(seed: int, index: int, frames: int, height: int, width: int, **kwargs: float) -> tuple[np.ndarray, str]:
    """Sample number ``index`` of the stream defined by ``seed``: (video in [0, 1], caption)."""
    (scene,) = sample_batch(seed, index, 1, frames, height, width, **kwargs)
    return render(scene), caption(scene)


def batch_tensor(scenes: Sequence[SceneSpec], device: torch.device | str = "cpu") -> torch.Tensor:
    """Scenes as the model's pixel space: ``(B, 3, frames, H, W)`` in [-1, 1] on ``device``."""
    return (render_batch(scenes, device).permute(0, 4, 1, 2, 3) * 2.0 - 1.0).contiguous()


def make_batch(
    seed: int,
    start: int,
    batch: int,
    frames: int,
    height: int,
    width: int,
    device: torch.device | str = "cpu",
    **kwargs: float,
) -> tuple[torch.Tensor, list[str]]:
    """A training batch: ``(B, 3, frames, H, W)`` in [-1, 1] on ``device`` plus its captions."""
    scenes = sample_batch(seed, start, batch, frames, height, width, **kwargs)
    return batch_tensor(scenes, device), [caption(s) for s in scenes]


def segment_color(video: np.ndarray, color: str, max_dist: float = 0.3) -> np.ndarray:
    """Boolean mask ``(frames, H, W)`` of saturated pixels closest to ``color`` in the palette (video in [0, 1])."""
    pal = np.asarray(list(COLORS.values()), dtype=np.float32)
    dist = np.linalg.norm(video[..., None, :] - pal, axis=-1)
    idx = list(COLORS).index(color)
    sat = video.max(-1) - video.min(-1)
    return (dist.argmin(-1) == idx) & (dist[..., idx] < max_dist) & (sat > 0.35)


def centroid_track(mask: np.ndarray, min_pixels: int = 4) -> np.ndarray:
    """Per-frame centroid ``(frames, 2)`` as (x, y); NaN where the colour is (almost) absent."""
    out = np.full((mask.shape[0], 2), np.nan, dtype=np.float64)
    for t, m in enumerate(mask):
        ys, xs = np.nonzero(m)
        if len(xs) >= min_pixels:
            out[t] = (xs.mean() + 0.5, ys.mean() + 0.5)
    return out


def motion_direction(track: np.ndarray, min_shift: float = 2.0) -> str | None:
    """Dominant direction of a centroid track (first vs last quarter of valid frames), None if it barely moves."""
    valid = track[~np.isnan(track).any(1)]
    if len(valid) < 4:
        return None
    q = max(len(valid) // 4, 1)
    dx, dy = valid[-q:].mean(0) - valid[:q].mean(0)
    if max(abs(dx), abs(dy)) < min_shift:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"

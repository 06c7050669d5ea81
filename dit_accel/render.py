"""Render a video with an accelerated pipeline: the engine behind ``dit-accel render``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["RenderRequest", "load_pipeline", "render", "write_video"]

VIDEO_SUFFIXES = (".mp4", ".gif")


@dataclass
class RenderRequest:
    """What to render and how to accelerate it."""

    model: str = "tiny-wan"
    prompt: str = ""
    negative_prompt: str = ""
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    steps: int | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0
    fps: int = 8
    guidance_scale: float | None = None
    out: str = "video.mp4"


def load_pipeline(model: str) -> tuple[Any, dict[str, Any]]:
    """A pipeline and its default call arguments from a built-in name or a local model directory."""
    if model.startswith("tiny-"):
        from .testing import TINY_FAMILIES, tiny_pipeline

        family = model.removeprefix("tiny-").replace("-", "_")
        if family not in TINY_FAMILIES:
            raise ValueError(
                f"--model {model!r}: built-in tiny models are {', '.join('tiny-' + f for f in TINY_FAMILIES)}"
            )
        pipe, kwargs = tiny_pipeline(family)
        pipe.set_progress_bar_config(disable=False)
        kwargs["output_type"] = "np"
        return pipe, kwargs
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model {model!r}: no such directory, and not a built-in name (tiny-wan, ...)")
    if not (path / "model_index.json").exists():
        raise ValueError(f"--model {model!r}: {path} has no model_index.json; is it a diffusers pipeline directory?")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path))
    return pipe, {"output_type": "np"}


def write_video(frames: np.ndarray, out: str | Path, fps: int) -> Path:
    """Write (F, H, W, 3) frames in [0, 1] as mp4, gif, or a folder of PNGs (any other path)."""
    import imageio.v2 as imageio

    out = Path(out)
    data = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    if out.suffix.lower() in VIDEO_SUFFIXES:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".mp4":
            imageio.mimwrite(out, list(data), fps=fps, codec="libx264", quality=8, macro_block_size=1)
        else:
            imageio.mimwrite(out, list(data), duration=1000.0 / fps, loop=0)
        return out
    out.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(data):
        imageio.imwrite(out / f"frame_{i:04d}.png", frame)
    return out


def _frames_of(output: Any) -> np.ndarray:
    frames = getattr(output, "frames", None)
    if frames is None:
        frames = getattr(output, "images", None)
    frames = frames[0] if isinstance(frames, (list, tuple)) or getattr(frames, "ndim", 0) == 5 else frames
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    return frames


def render(request: RenderRequest) -> dict[str, Any]:
    """Render, write the file, and return a summary (time, file, stats)."""
    import dit_accel

    out = Path(request.out)
    target = out.parent if out.suffix else out
    target = target if str(target) else Path(".")
    _check_writable(target)
    pipe, kwargs = load_pipeline(request.model)
    for key, value in (
        ("num_inference_steps", request.steps),
        ("num_frames", request.frames),
        ("height", request.height),
        ("width", request.width),
        ("guidance_scale", request.guidance_scale),
    ):
        if value is not None:
            kwargs[key] = value
    if request.prompt and "prompt_embeds" not in kwargs:
        kwargs["prompt"] = request.prompt
        if request.negative_prompt:
            kwargs["negative_prompt"] = request.negative_prompt
    handle = dit_accel.accelerate(pipe, request.method, **request.options)
    generator = torch.Generator().manual_seed(request.seed)
    start = time.perf_counter()
    try:
        output = pipe(**kwargs, generator=generator)
    except (ValueError, RuntimeError) as exc:
        handle.remove()
        raise ValueError(f"the model could not render this request: {exc}") from exc
    seconds = time.perf_counter() - start
    stats = handle.stats()
    handle.remove()
    path = write_video(_frames_of(output), out, request.fps)
    return {"out": str(path), "seconds": seconds, "method": stats["method"], "stats": stats}


def _check_writable(folder: Path) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not _can_write(probe):
        raise PermissionError(f"--out: cannot write under {folder}")


def _can_write(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK)


def summary_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)


def default_model() -> str:
    """The shipped toy model when present in the source tree or package, else the built-in tiny Wan."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "assets" / "toy-wan", here.parent / "assets" / "toy-wan"):
        if (candidate / "model_index.json").exists():
            return str(candidate)
    return "tiny-wan"

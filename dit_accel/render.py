"""Render a video with an accelerated pipeline: the engine behind ``dit-accel render``.

Everything runs offline: a model is a built-in tiny name, a local diffusers pipeline directory, or a diffusers
id that is already in the local Hugging Face cache (looked up with ``local_files_only``; never downloaded).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "ModelNotFoundError",
    "RenderRequest",
    "apply_request",
    "available_devices",
    "check_device",
    "check_output",
    "check_size",
    "default_device",
    "default_model",
    "estimate_speedup",
    "FlopCounter",
    "load_pipeline",
    "output_kind",
    "prepare_folder",
    "render",
    "validate_request",
    "write_video",
]

#: what ``--out`` may be: a video, one PNG (a one-frame render), or a folder that receives ``frame_0000.png``, ...
OUT_FORMATS = ".mp4 (H.264), .gif, .png (a single frame), or a folder for PNG frames (no suffix, or ending in '/')"


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a built-in name, a local pipeline directory nor a cached diffusers id."""


@dataclass
class RenderRequest:
    """What to render and how to accelerate it. ``None`` fields keep the model's own defaults."""

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
    device: str | None = None
    dtype: str | None = None
    progress: bool = True
    #: FreeSwim (Wan or the toy): the training resolution; a larger height/width renders with FreeSwimPipeline.
    base_height: int | None = None
    base_width: int | None = None
    freeswim: dict[str, Any] = field(default_factory=dict)  # FreeSwim options, e.g. strength, cache_every
    #: also render without acceleration (same seed), to report the measured speed-up and PSNR against dense
    compare_dense: bool = False


def _check_int(flag: str, value: Any, low: int = 1) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{flag} {value!r}: must be an integer >= {low}")


def validate_request(request: RenderRequest) -> None:
    """Refuse settings that cannot render (zero steps, a negative size, an unknown ``--out`` suffix, a device
    this machine lacks) before anything is loaded; each message names the flag and what it allows."""
    for flag, value in (
        ("--steps", request.steps),
        ("--frames", request.frames),
        ("--height", request.height),
        ("--width", request.width),
        ("--fps", request.fps),
        ("--base-height", request.base_height),
        ("--base-width", request.base_width),
        ("--cache-every", request.freeswim.get("cache_every")),
    ):
        _check_int(flag, value)
    gs = request.guidance_scale
    if gs is not None and (isinstance(gs, bool) or not isinstance(gs, (int, float)) or not math.isfinite(gs) or gs < 0):
        raise ValueError(f"--guidance-scale {gs!r}: must be a finite number >= 0")
    strength = request.freeswim.get("strength")
    if strength is not None and not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
        raise ValueError(f"--strength {strength!r}: must be in (0, 1]")
    check_output(request.out)
    check_device(request.device)


def output_kind(out: str | os.PathLike[str]) -> str:
    """What ``out`` names: ``"mp4"``, ``"gif"``, ``"png"`` (one frame) or ``"folder"`` (PNG frames).

    A folder is a path without a suffix, a path ending in ``/``, or an existing directory; any other suffix
    (``.avi``, ``.webm``, ...) raises ``ValueError`` listing the supported ones, so no folder named ``x.avi`` is
    ever made by accident.
    """
    text = os.fspath(out)
    path = Path(text)
    suffix = path.suffix.lower()
    if text.endswith(("/", os.sep)) or not suffix:
        return "folder"
    if suffix in (".mp4", ".gif", ".png"):
        return suffix[1:]
    if path.is_dir():
        return "folder"
    raise ValueError(f"--out {text!r}: unsupported suffix {path.suffix!r}; supported: {OUT_FORMATS}")


def check_output(out: str | os.PathLike[str]) -> str:
    """:func:`output_kind`, plus: a file output must not be an existing folder, a folder output not a file."""
    kind = output_kind(out)
    path = Path(out)
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ValueError(f"--out {os.fspath(out)!r} is an existing file; PNG frames go into a folder")
    if kind != "folder" and path.is_dir():
        example = path / "video.mp4"
        raise ValueError(f"--out {os.fspath(out)!r} is an existing folder; name a file inside it, e.g. {example}")
    return kind


def available_devices() -> list[str]:
    """The torch devices this machine can run on: ``cpu``, and ``cuda``/``cuda:i``, ``mps``, ``xpu`` when present."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += ["xpu", *(f"xpu:{i}" for i in range(xpu.device_count()))]
    return devices


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuse a device string torch does not know, or a device this machine does not have (``--device cuda``
    without CUDA), naming the flag and listing :func:`available_devices`."""
    if device is None:
        return
    available = available_devices()
    listed = ", ".join(available)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{flag} {device!r}: not a torch device name; available here: {listed}") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"{flag} {device!r}: CUDA is not available ({why}); available here: {listed}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{flag} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s); available: {listed}"
            )
        return
    present = dev.type in {d.split(":")[0] for d in available}
    if dev.index is not None and dev.type != "mps":  # mps has one device, cuda and xpu list theirs
        present = present and f"{dev.type}:{dev.index}" in available
    if not present:
        raise ValueError(f"{flag} {device!r}: {dev.type} is not available on this machine; available here: {listed}")


def _torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
    table.update({"bfloat16": torch.bfloat16, "bf16": torch.bfloat16})
    if name not in table:
        raise ValueError(f"--dtype {name!r}: allowed values are {', '.join(table)}")
    return table[name]


def _pipeline_class(index: dict[str, Any]) -> Any:
    """The pipeline class named in model_index.json: diffusers' own, else dit_accel's (the shipped toy)."""
    import diffusers

    name = index.get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None:
        for module in ("dit_accel.toy",):
            cls = getattr(importlib.import_module(module), name, None)
            if cls is not None:
                break
    if cls is None:
        cls = diffusers.DiffusionPipeline
    return cls


def default_device() -> str:
    """``cuda:LOCAL_RANK`` when CUDA is available (one GPU per process under a launcher), else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def load_pipeline(
    model: str, *, device: str | None = None, dtype: str | None = None, progress: bool = False
) -> tuple[Any, dict[str, Any]]:
    """A pipeline and its default call arguments from a built-in name, a local directory or a cached hub id.

    ``device=None`` picks :func:`default_device`.
    """
    check_device(device)
    torch_dtype = _torch_dtype(dtype)
    device = device or default_device()
    if model.startswith("tiny-"):
        from .testing import TINY_FAMILIES, tiny_pipeline

        family = model.removeprefix("tiny-").replace("-", "_")
        if family not in TINY_FAMILIES:
            raise ModelNotFoundError(
                f"--model {model!r}: built-in tiny models are {', '.join('tiny-' + f for f in TINY_FAMILIES)}"
            )
        pipe, kwargs = tiny_pipeline(family)
        kwargs["output_type"] = "np"
    else:
        with _loading_bar(progress):
            pipe, kwargs = _load_from_disk_or_cache(model, torch_dtype)
    if torch_dtype is not None and model.startswith("tiny-"):
        pipe.to(dtype=torch_dtype)
    if device != "cpu":
        pipe.to(device)
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    pipe.set_progress_bar_config(disable=not progress)
    return pipe, kwargs


@contextmanager
def _loading_bar(progress: bool) -> Iterator[None]:
    """diffusers' "Loading pipeline components" bar only when progress output is wanted."""
    from diffusers.utils import logging as diffusers_logging

    enabled = diffusers_logging.is_progress_bar_enabled()
    if not progress:
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            diffusers_logging.enable_progress_bar()


def _load_from_disk_or_cache(model: str, torch_dtype: torch.dtype | None) -> tuple[Any, dict[str, Any]]:
    path = Path(model).expanduser()
    load_kwargs: dict[str, Any] = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    if path.exists():
        index_file = path / "model_index.json"
        if not index_file.exists():
            raise ModelNotFoundError(
                f"--model {model!r}: {path} has no model_index.json; is it a diffusers pipeline directory?"
            )
        cls = _pipeline_class(json.loads(index_file.read_text()))
        pipe = cls.from_pretrained(str(path), **load_kwargs)
    else:
        pipe = _load_cached_hub_pipeline(model, load_kwargs)
    return pipe, {"output_type": "np"}


def _load_cached_hub_pipeline(model: str, load_kwargs: dict[str, Any]) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    looks_like_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if not looks_like_id:
        raise ModelNotFoundError(
            f"--model {model!r}: no such directory, not a built-in name (tiny-wan, ...) and not a hub id like "
            "'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'"
        )
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "model_index.json")
    if not isinstance(cached, str):
        raise ModelNotFoundError(
            f"--model {model!r}: not in the local Hugging Face cache (offline; nothing is downloaded). "
            f"Fetch it first on a connected machine, e.g. `huggingface-cli download {model}`, or pass a directory."
        )
    cls = _pipeline_class(json.loads(Path(cached).read_text()))
    try:
        return cls.from_pretrained(model, local_files_only=True, **load_kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"--model {model!r}: the cached copy is incomplete ({exc})") from None


def _call_parameters(pipe: Any) -> set[str]:
    try:
        return set(inspect.signature(pipe.__call__).parameters)
    except (TypeError, ValueError):
        return set()


def apply_request(
    pipe: Any,
    kwargs: dict[str, Any],
    *,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
) -> dict[str, Any]:
    """Call arguments with the requested settings; options the pipeline does not take raise a clear error."""
    out = dict(kwargs)
    params = _call_parameters(pipe)
    for flag, value in (("--steps", steps), ("--frames", frames), ("--height", height), ("--width", width)):
        _check_int(flag, value)
    for key, flag, value in (
        ("num_inference_steps", "--steps", steps),
        ("num_frames", "--frames", frames),
        ("height", "--height", height),
        ("width", "--width", width),
        ("guidance_scale", "--guidance-scale", guidance_scale),
    ):
        if value is None:
            continue
        if params and key not in params:
            raise ValueError(f"{flag}: {type(pipe).__name__} takes no {key} (is it an image model?)")
        out[key] = value
    has_encoder = getattr(pipe, "text_encoder", None) is not None
    if prompt:
        if not has_encoder:
            # Built-in tiny models have no text encoder: they render from fixed random embeddings.
            if out.get("prompt_embeds") is None:
                raise ValueError("--prompt: this model has no text encoder and no prompt embeddings")
        else:
            for key in ("prompt_embeds", "negative_prompt_embeds"):
                out.pop(key, None)
            out["prompt"] = prompt
            if negative_prompt:
                out["negative_prompt"] = negative_prompt
    elif has_encoder and "prompt_embeds" not in out and "prompt" not in out:
        # No prompt given: the model's own example prompt if it has one (the shipped toy model does).
        out["prompt"] = getattr(pipe, "default_prompt", "") or ""
    return out


def _patch_size(transformer: Any) -> tuple[int, int, int] | None:
    config = getattr(transformer, "config", None)
    patch = getattr(config, "patch_size", None)
    if patch is None:
        return None
    if isinstance(patch, (list, tuple)):
        return (
            (int(patch[0]), int(patch[-2]), int(patch[-1])) if len(patch) == 3 else (1, int(patch[0]), int(patch[-1]))
        )
    patch_t = getattr(config, "patch_size_t", None) or 1
    return int(patch_t), int(patch), int(patch)


def _call_default(pipe: Any, name: str) -> Any:
    """The default of ``pipe.__call__``'s parameter ``name``, or None."""
    try:
        param = inspect.signature(pipe.__call__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    if param is None or param.default is inspect.Parameter.empty:
        return None
    return param.default


def check_size(pipe: Any, kwargs: dict[str, Any]) -> None:
    """Reject a height/width/frame count the model cannot tile, before spending time on text encoding.

    A size that is not given (say ``--height`` without ``--width``) is the pipeline's own default, so the check
    also applies when only one of them is set.
    """
    given = {key: kwargs.get(key) for key in ("height", "width", "num_frames")}
    for name, value in (("height", given["height"]), ("width", given["width"]), ("frames", given["num_frames"])):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"--{name} {value!r}: must be a positive integer")
    defaults = {key: _call_default(pipe, key) for key, value in given.items() if value is None}
    height, width, frames = (given[key] if given[key] is not None else defaults.get(key) for key in given)
    transformer = getattr(pipe, "transformer", None)
    patch = _patch_size(transformer)
    if patch is None or not isinstance(height, int) or not isinstance(width, int):
        return
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or 1)
    multiple = spatial * patch[1]
    if height % multiple or width % multiple:

        def shown(flag: str, key: str, value: int) -> str:
            return f"--{flag} {value}" + (" (the model's default)" if given[key] is None else "")

        raise ValueError(
            f"{shown('height', 'height', height)} {shown('width', 'width', width)}: {type(pipe).__name__} needs "
            f"multiples of {multiple} (VAE factor {spatial} x patch {patch[1]}); try "
            f"{max(multiple, height // multiple * multiple)} x {max(multiple, width // multiple * multiple)}"
        )
    temporal = getattr(pipe, "vae_scale_factor_temporal", None)
    if isinstance(frames, int) and temporal and temporal > 1 and (frames - 1) % temporal:
        raise ValueError(
            f"--frames {frames}: {type(pipe).__name__} needs 1 + a multiple of {temporal} frames "
            f"(e.g. {1 + max(1, (frames - 1) // temporal) * temporal})"
        )


def frame_count(pipe: Any, kwargs: dict[str, Any]) -> int | None:
    """How many frames the call will make: ``num_frames`` (given or the pipeline's default), 1 for image models,
    None when unknown."""
    if "num_frames" in kwargs and kwargs["num_frames"] is not None:
        return int(kwargs["num_frames"])
    params = _call_parameters(pipe)
    if params and "num_frames" not in params:
        return 1
    default = _call_default(pipe, "num_frames")
    return int(default) if isinstance(default, int) else None


def write_video(frames: np.ndarray, out: str | Path, fps: int) -> Path:
    """Write (F, H, W, 3) frames in [0, 1] as mp4, gif, one PNG (a single frame) or a folder of PNGs.

    See :func:`output_kind` for which path is which; an unsupported suffix raises ``ValueError``.
    """
    import imageio.v2 as imageio

    kind = output_kind(out)
    _check_int("--fps", fps)
    out = Path(out)
    data = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    if data.shape[-1] == 1:
        data = np.repeat(data, 3, axis=-1)
    if kind == "png" and data.shape[0] != 1:
        raise ValueError(
            f"--out {str(out)!r}: a .png holds one frame and this render has {data.shape[0]}; use --frames 1, "
            "or .mp4, .gif or a folder"
        )
    if kind != "folder":
        out.parent.mkdir(parents=True, exist_ok=True)
        if kind == "mp4":
            imageio.mimwrite(out, list(data), fps=fps, codec="libx264", quality=8, macro_block_size=1)
        elif kind == "gif":
            imageio.mimwrite(out, list(data), duration=1000.0 / fps, loop=0)
        else:
            imageio.imwrite(out, data[0])
        return out
    out.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(data):
        imageio.imwrite(out / f"frame_{i:04d}.png", frame)
    return out


def frames_of(output: Any) -> np.ndarray:
    """(F, H, W, C) float frames from a pipeline output (video ``frames`` or image ``images``)."""
    frames = getattr(output, "frames", None)
    if frames is None:
        frames = getattr(output, "images", None)
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    if isinstance(frames, (list, tuple)) or getattr(frames, "ndim", 0) == 5:
        frames = frames[0]
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    return frames


_frames_of = frames_of  # kept for callers of the earlier private name


def estimate_speedup(attention_share: float, density: float | None) -> float | None:
    """Amdahl estimate ``1 / ((1 - a) + a * d)`` from the attention share ``a`` of dense run time and the kept
    density ``d``; assumes sparse attention costs in proportion to the blocks it computes."""
    if density is None:
        return None
    a = min(max(attention_share, 0.0), 1.0)
    return 1.0 / ((1.0 - a) + a * density)


def effective_density(overall: dict[str, Any]) -> float | None:
    """Fraction of dense attention work done, counting dense calls as 1; None when nothing was counted."""
    dense = overall.get("dense_calls", 0)
    measured = overall.get("sparse_calls", 0) + overall.get("refresh_calls", 0)
    total = dense + measured
    if total == 0:
        return None
    block = overall.get("block_density")
    return (dense + (block if block is not None else 1.0) * measured) / total


class FlopCounter:
    """Observer that counts self-attention and transformer FLOPs to estimate attention's share of the work."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.params = sum(p.numel() for p in transformer.parameters())
        self.attention = 0.0
        self.other = 0.0

    def __call__(self, event: Any) -> None:
        b, h, n, d = event.q.shape
        self.attention += 4.0 * b * h * n * n * d
        if event.site_index == 0:
            self.other += 2.0 * b * n * self.params

    def share(self) -> float:
        total = self.attention + self.other
        return self.attention / total if total else 0.0


def render(request: RenderRequest) -> dict[str, Any]:
    """Render, write the file, and return a summary (time, file, stats, speed-up estimate)."""
    import dit_accel

    validate_request(request)
    out = Path(request.out)
    kind = output_kind(request.out)
    target = out if kind == "folder" else out.parent
    prepare_folder(target if str(target) else Path("."))
    pipe, kwargs = load_pipeline(request.model, device=request.device, dtype=request.dtype, progress=request.progress)
    kwargs = apply_request(
        pipe,
        kwargs,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        frames=request.frames,
        height=request.height,
        width=request.width,
        guidance_scale=request.guidance_scale,
    )
    check_size(pipe, kwargs)
    count = frame_count(pipe, kwargs)
    if kind == "png" and count is not None and count != 1:
        raise ValueError(
            f"--out {request.out!r}: a .png holds one frame and this render makes {count} (--frames); use "
            "--frames 1, or .mp4, .gif or a folder"
        )
    if request.base_height is not None or request.base_width is not None:
        from .pipelines.freeswim import maybe_freeswim  # the method then accelerates FreeSwim's base pass

        pipe, kwargs = maybe_freeswim(pipe, kwargs, request.base_height, request.base_width, **request.freeswim)
    if request.compare_dense:  # one untimed step first, so neither timed render pays the first call's costs
        try:
            pipe(**{**kwargs, "num_inference_steps": 1}, generator=torch.Generator().manual_seed(request.seed))
        except Exception:  # noqa: BLE001 - e.g. FreeSwim needs more steps; the timed renders report real errors
            pass
    handle = dit_accel.accelerate(pipe, request.method, **request.options)
    counters = [FlopCounter(acc.transformer) for acc in handle.accelerators.values()]
    for counter, acc in zip(counters, handle.accelerators.values()):
        acc.observers.append(counter)
    generator = torch.Generator().manual_seed(request.seed)
    _sync()
    start = time.perf_counter()
    try:
        output = pipe(**kwargs, generator=generator)
        _sync()
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"the model could not render this request: {exc}") from exc
    finally:
        handle.remove()
    seconds = time.perf_counter() - start
    stats = handle.stats()
    path = write_video(frames_of(output), out, request.fps)
    density = effective_density(stats["overall"])
    share = counters[0].share() if counters else 0.0
    measured = _time_dense(pipe, kwargs, request.seed, frames_of(output), seconds) if request.compare_dense else {}
    return {
        "out": str(path),
        "frames": int(frames_of(output).shape[0]),
        "seconds": seconds,
        "device": str(_device_of(pipe)),
        **measured,
        "method": stats["method"],
        "attention_flop_share": share,
        "effective_density": density,
        "estimated_speedup": estimate_speedup(share, density),
        "stats": stats,
        **({"freeswim": pipe.last_stats} if getattr(pipe, "last_stats", None) else {}),
    }


def _device_of(pipe: Any) -> torch.device:
    """The device a pipeline (or module) runs on; the CPU when it does not say."""
    device = getattr(pipe, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def _time_dense(pipe: Any, kwargs: dict[str, Any], seed: int, frames: np.ndarray, seconds: float) -> dict[str, Any]:
    """The same render without acceleration (same seed), timed: the measured speed-up on this device and the
    accelerated frames' PSNR against dense."""
    from .eval.metrics import psnr

    _sync()
    start = time.perf_counter()
    dense = pipe(**kwargs, generator=torch.Generator().manual_seed(seed))
    _sync()
    dense_seconds = time.perf_counter() - start
    return {
        "dense_seconds": dense_seconds,
        "measured_speedup": dense_seconds / seconds if seconds > 0 else None,
        "psnr_vs_dense": psnr(frames, frames_of(dense)),
    }


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def prepare_folder(folder: str | os.PathLike[str], flag: str = "--out") -> Path:
    """Create ``folder`` (and its parents) and check it can be written (a real write probe: as root ``os.access``
    says yes to almost anything); raises ``PermissionError`` naming ``flag`` and the real cause, e.g. a path
    component that is a file ("Not a directory", where ``mkdir`` itself would say "File exists")."""
    import errno
    import tempfile

    folder = Path(folder)
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                raise PermissionError(
                    f"{flag}: cannot write under {folder} ({os.strerror(errno.ENOTDIR)}: {part} is a file)"
                ) from None
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dit-accel-write-test"):
            pass
    except OSError as exc:
        raise PermissionError(f"{flag}: cannot write under {folder} ({exc.strerror or exc})") from None
    return folder


def summary_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)


def default_model() -> str:
    """The shipped toy model when present in the source tree or package, else the built-in tiny Wan."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "assets" / "toy-wan", here.parent / "assets" / "toy-wan"):
        if (candidate / "model_index.json").exists():
            return str(candidate)
    return "tiny-wan"

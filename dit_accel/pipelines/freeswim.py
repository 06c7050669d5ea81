"""FreeSwim: training-free higher-resolution video on an unmodified diffusers ``WanPipeline``.

FreeSwim (Wu et al., arXiv 2511.14712; code at 9f35a72, see shared/research/peers.md section 4) renders above a
model's training resolution in two passes: a base pass at the training resolution, an upscale, and a
video-to-video refinement at the target resolution in which

* self-attention is restricted to an inward window of the training grid's size (the *window branch* W), so every
  query keeps the receptive field it was trained with;
* on guide steps (every ``cache_every`` refinement steps, conditional pass) a full-attention branch F runs, and its
  cross-attention output replaces W's in every block; the per-block outputs are cached and reused by W's
  conditional pass on the other steps; the unconditional pass runs W alone.

The official code forks diffusers' Wan model and pipeline. Here the stock ``WanPipeline`` and
``WanVideoToVideoPipeline`` run unchanged; everything is instance-scoped diffusers ``ModelHook`` s
(:class:`FreeSwimHooks`) on the transformer, the ``attn1`` and the ``attn2`` modules, installed for the
refinement only and removed afterwards. W's window runs through :class:`dit_accel.methods.ComposedMethod`'s inward
3D-tile pattern on the block-sparse kernel; F is the model's own dense attention.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import WanPipeline, WanVideoToVideoPipeline
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.pipelines.wan.pipeline_wan_video2video import retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from torch.overrides import TorchFunctionMode

from ..core import SiteGroup, SiteStats
from ..layout import TokenLayout
from ..methods import ComposedMethod, Method
from ..runtime import bind_sdpa, remove_hook
from ..state import DenoiseState
from .freeswim_window import WindowGeometry, freeswim_scale, window_geometry

__all__ = [
    "FreeSwimHooks",
    "FreeSwimMixin",
    "FreeSwimOptions",
    "FreeSwimPipeline",
    "FreeSwimStats",
    "maybe_freeswim",
    "upscale_latents",
    "upscale_video",
]

TRANSFORMER_HOOK = "dit_accel.freeswim"
ATTN1_HOOK = "dit_accel.freeswim.attn1"
ATTN2_HOOK = "dit_accel.freeswim.attn2"
UPSCALE_MODES = ("frames", "latents")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Branch(str, Enum):
    """What the transformer forward in flight computes."""

    OFF = "off"  # hooks pass through (base pass, or outside the refinement)
    FULL = "full"  # F: dense self-attention; its attn2 outputs are cached
    WINDOW_COND = "window_cond"  # W, conditional: attn2 replaced by the cached F output
    WINDOW_UNCOND = "window_uncond"  # W, unconditional: attn2 computed normally


@dataclass
class FreeSwimStats:
    """Counters of one refinement (JSON-serialisable through :meth:`as_dict`).

    FreeSwim's own counters (steps, branches, the cross-attention cache); the window branch's attention calls
    are counted by the site core (:attr:`sites`), like every other integration's.
    """

    steps: int = 0
    guide_steps: list[int] = field(default_factory=list)
    full_forwards: int = 0
    window_forwards: int = 0
    full_self_attention_calls: int = 0
    attn2_computed: int = 0  # by F, stored in the cache
    attn2_reused: int = 0  # W conditional: F's cached output used instead of computing attn2
    attn2_plain: int = 0  # W unconditional: attn2 computed as usual
    cache_bytes: int = 0
    cache_bytes_peak: int = 0
    cache_dtype: str = "auto"
    cache_device: str = "same"
    sites: SiteGroup | None = None  # W's self-attention sites

    def _window(self) -> SiteStats:
        total = SiteStats()
        for site in self.sites.sites if self.sites is not None else ():
            total.add(site.stats)
        return total

    @property
    def window_calls(self) -> int:
        """W's self-attention calls that ran sparse (the inward window)."""
        return self._window().sparse_calls

    @property
    def window_dense(self) -> Counter:
        """W's self-attention calls that stayed dense, by reason (``dit_accel.core.DENSE_REASONS``)."""
        return self._window().dense_reasons

    def as_dict(self) -> dict[str, Any]:
        window = self._window()
        density = float(window.density_sum) / window.sparse_calls if window.sparse_calls else None
        return {
            "steps": self.steps,
            "guide_steps": list(self.guide_steps),
            "full_forwards": self.full_forwards,
            "window_forwards": self.window_forwards,
            "full_self_attention_calls": self.full_self_attention_calls,
            "window_calls": window.sparse_calls,
            "window_dense_calls": dict(window.dense_reasons),
            "window_block_density": density,
            "window_pattern_builds": window.pattern_builds,
            "attn2_computed": self.attn2_computed,
            "attn2_reused": self.attn2_reused,
            "attn2_plain": self.attn2_plain,
            "cache_bytes": self.cache_bytes,
            "cache_bytes_peak": self.cache_bytes_peak,
            "cache_dtype": self.cache_dtype,
            "cache_device": self.cache_device,
        }


@dataclass(frozen=True)
class FreeSwimOptions:
    """FreeSwim's knobs (validated; errors name the parameter, the value and what is allowed).

    Attributes:
        base_height, base_width: the model's training resolution in pixels; the window is its latent grid.
        strength: fraction of the refinement's ``num_inference_steps`` actually run (SDEdit), in (0, 1].
        cache_every: a guide step (full branch, cross-attention recomputed and cached) every k refinement steps.
        upscale: ``frames`` (decode, resize bilinearly, re-encode; the default, as the paper) or ``latents``
            (resize the latents; skips the VAE round trip but leaves the VAE's latent manifold).
        window_frames: latent frames in the window (None: all frames, as the paper).
        window_size: window (rows, cols) in latent tokens; None: the base latent grid.
        attention_scale: use FreeSwim's softmax scale ``sqrt(log(2n)/log(n)/d)`` (n: base grid tokens per frame)
            in both branches' self-attention, as the official code does; False keeps ``1/sqrt(d)``.
        block_size: kernel block (64 or 128); the tile volume.
        tile: 3D tile (frames, rows, cols); None picks the one that fits the window best.
        cache_dtype: dtype of the cached cross-attention outputs (None: the model's).
        cache_offload: keep the cache on the CPU between steps (pinned on CUDA machines).
        refine_shift: flow shift of the refinement's scheduler (the official code uses 9.0); None keeps the
            pipeline's.
        base_num_inference_steps: steps of the base pass; None: ``num_inference_steps``.
    """

    base_height: int = 480
    base_width: int = 832
    strength: float = 0.7
    cache_every: int = 2
    upscale: str = "frames"
    window_frames: int | None = None
    window_size: tuple[int, int] | None = None
    attention_scale: bool = True
    block_size: int = 64
    tile: tuple[int, int, int] | None = None
    cache_dtype: str | torch.dtype | None = None
    cache_offload: bool = False
    refine_shift: float | None = None
    base_num_inference_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("base_height", "base_width", "cache_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise ValueError(f"strength={self.strength!r} must be a number in (0, 1]")
        if not 0.0 < float(self.strength) <= 1.0:
            raise ValueError(f"strength={self.strength!r} is outside (0, 1]")
        if self.upscale not in UPSCALE_MODES:
            raise ValueError(f"upscale={self.upscale!r} is not allowed; choose one of {', '.join(UPSCALE_MODES)}")
        if self.window_frames is not None and (isinstance(self.window_frames, bool) or self.window_frames < 1):
            raise ValueError(f"window_frames={self.window_frames!r} must be None (all frames) or a positive count")
        if self.window_size is not None:
            ws = tuple(self.window_size)
            if len(ws) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in ws):
                raise ValueError(f"window_size={self.window_size!r} must be None or two positive token counts")
            object.__setattr__(self, "window_size", ws)
        if self.block_size not in (64, 128):
            raise ValueError(f"block_size={self.block_size!r} is not supported; allowed: 64, 128")
        if self.tile is not None:
            tile = tuple(self.tile)
            if len(tile) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in tile):
                raise ValueError(f"tile={self.tile!r} must be None or three positive integers (frames, rows, cols)")
            object.__setattr__(self, "tile", tile)
        if isinstance(self.cache_dtype, str) and self.cache_dtype not in _DTYPES:
            raise ValueError(f"cache_dtype={self.cache_dtype!r} is not allowed; choose one of {', '.join(_DTYPES)}")
        if self.refine_shift is not None and not self.refine_shift > 0:
            raise ValueError(f"refine_shift={self.refine_shift!r} must be None or a positive number")
        if self.base_num_inference_steps is not None and self.base_num_inference_steps < 1:
            raise ValueError(f"base_num_inference_steps={self.base_num_inference_steps!r} must be positive")

    @property
    def torch_cache_dtype(self) -> torch.dtype | None:
        if isinstance(self.cache_dtype, str):
            return _DTYPES[self.cache_dtype]
        return self.cache_dtype


# ---------------------------------------------------------------------------------------------------------------
# hooks


class _Intercept(TorchFunctionMode):
    """Routes the ``F.scaled_dot_product_attention`` call of one ``attn1`` forward to FreeSwim."""

    def __init__(self, hooks: FreeSwimHooks, site: int) -> None:
        super().__init__()
        self.hooks = hooks
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.hooks._self_attention(self.site, func, args, kwargs)
        return func(*args, **kwargs)


class _TransformerHook(ModelHook):
    def __init__(self, hooks: FreeSwimHooks) -> None:
        super().__init__()
        self.hooks = hooks

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.hooks._forward(self.fn_ref.original_forward, module, args, kwargs)


class _Attn1Hook(ModelHook):
    """W: the inward window through the block-sparse kernel; F: the stock dense attention (with FreeSwim's scale).

    Runs the module's class ``forward`` (the stock processor) directly, so hooks installed earlier on this module
    (e.g. ``dit_accel.accelerate``'s site hook for the base pass) do not see the refinement's attention.
    """

    def __init__(self, hooks: FreeSwimHooks, site: int) -> None:
        super().__init__()
        self.hooks = hooks
        self.site = site

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.hooks.branch is Branch.OFF:
            return self.fn_ref.original_forward(*args, **kwargs)
        with _Intercept(self.hooks, self.site):
            return type(module).forward(module, *args, **kwargs)


class _Attn2Hook(ModelHook):
    """F: compute and cache the cross-attention output; W conditional: return F's cached output instead."""

    def __init__(self, hooks: FreeSwimHooks, site: int) -> None:
        super().__init__()
        self.hooks = hooks
        self.site = site

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        branch = self.hooks.branch
        if branch is Branch.WINDOW_COND:
            return self.hooks._load(self.site, args[0] if args else kwargs["hidden_states"])
        out = self.fn_ref.original_forward(*args, **kwargs)
        if branch is Branch.FULL:
            self.hooks._store(self.site, out)
        elif branch is Branch.WINDOW_UNCOND:
            self.hooks.stats.attn2_plain += 1
        return out


def _timestep_value(timestep: Any) -> float | None:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().float().max().item()) if timestep.numel() else None
    return float(timestep)


class FreeSwimHooks:
    """FreeSwim's dual-branch refinement on one ``WanTransformer3DModel``, as removable instance-scoped hooks.

    Each transformer call is classified by its timestep: the first call at a new timestep is the conditional pass,
    the next one (same timestep) the unconditional pass, as in diffusers' Wan loops. A conditional pass on a guide
    step (refinement step ``i`` with ``i % cache_every == 0``, or whenever the cache does not fit the batch) runs
    the transformer twice: F (dense self-attention; every block's ``attn2`` output cached), then W with those
    outputs. Other conditional passes run W with the cached outputs; ``attn2`` is not computed at all.

    Args:
        transformer: the Wan transformer.
        window_hw: W's window (rows, cols) in latent tokens, i.e. the base latent grid.
        options: :class:`FreeSwimOptions` (cache_every, window_frames, block_size, tile, cache dtype/offload).
        scale: softmax scale of self-attention in both branches; None keeps the model's ``1/sqrt(d)``.
        method_factory: builds W's method for a :class:`WindowGeometry` (default: the inward ``window`` preset on
            :class:`ComposedMethod`); the benchmark swaps in other densities.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        window_hw: tuple[int, int],
        options: FreeSwimOptions,
        *,
        scale: float | None = None,
        method_factory: Callable[[WindowGeometry], Method] | None = None,
    ) -> None:
        self.transformer = transformer
        self.window_hw = window_hw
        self.options = options
        self.scale = scale
        self.method_factory = method_factory or (lambda geo: ComposedMethod(geo.config()))
        self.blocks = list(getattr(transformer, "blocks", []))
        if not self.blocks or not all(hasattr(b, "attn1") and hasattr(b, "attn2") for b in self.blocks):
            raise TypeError(
                f"FreeSwim needs a Wan transformer (blocks with attn1/attn2); got {type(transformer).__name__}"
            )
        patch = transformer.config.patch_size
        self.patch = tuple(int(p) for p in patch)
        #: W's self-attention sites (the site core); its method follows the window geometry of the call
        self.sites: SiteGroup | None = None
        self.stats = FreeSwimStats(
            cache_dtype=str(options.torch_cache_dtype).removeprefix("torch.") if options.cache_dtype else "auto",
            cache_device="cpu" if options.cache_offload else "same",
        )
        #: Set to a :class:`Branch` to run every forward in that branch (benchmarks); None: FreeSwim's schedule.
        self.force_branch: Branch | None = None
        self.branch = Branch.OFF
        self.geometry: WindowGeometry | None = None
        self.method: Method | None = None
        self._layout: TokenLayout | None = None
        self._cache: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._step = -1
        self._calls = 0
        self._last_t: float | None = None
        self._installed: list[tuple[torch.nn.Module, str]] = []

    # -- install / remove ---------------------------------------------------------------------------------------
    def install(self) -> FreeSwimHooks:
        """Register the hooks (outermost on each module, so they wrap any installed earlier)."""
        if self._installed:
            return self
        try:
            self._register(self.transformer, _TransformerHook(self), TRANSFORMER_HOOK)
            for i, block in enumerate(self.blocks):
                self._register(block.attn1, _Attn1Hook(self, i), ATTN1_HOOK)
                self._register(block.attn2, _Attn2Hook(self, i), ATTN2_HOOK)
        except Exception:
            self.remove()
            raise
        return self

    def _register(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._installed.append((module, name))

    def remove(self) -> None:
        """Take every hook off and free the cache; the transformer computes exactly as before."""
        for module, name in reversed(self._installed):
            remove_hook(module, name)
        self._installed.clear()
        self.clear_cache()
        self.branch = Branch.OFF

    def clear_cache(self) -> None:
        self._cache = [None] * len(self.blocks)
        if self.sites is not None:
            self.sites.new_generation()
        self.stats.cache_bytes = 0

    def __enter__(self) -> FreeSwimHooks:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # -- the transformer forward -------------------------------------------------------------------------------
    def _geometry_for(self, hidden_states: torch.Tensor) -> None:
        _, _, f, h, w = hidden_states.shape
        pt, ph, pw = self.patch
        grid = (f // pt, h // ph, w // pw)
        if self.geometry is None or self.geometry.grid != grid:
            o = self.options
            self.geometry = window_geometry(
                grid, self.window_hw, block=o.block_size, window_frames=o.window_frames, tile=o.tile
            )
            self.method = self.method_factory(self.geometry)
            self._layout = TokenLayout(grid)
            if self.sites is None:
                self.sites = SiteGroup(self.method.config, method=self.method)
                self.stats.sites = self.sites
            else:
                self.sites.use_method(self.method)

    def _forward(self, forward: Callable[..., Any], module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        bound = inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs).arguments
        hidden_states = bound["hidden_states"]
        self._geometry_for(hidden_states)
        t = _timestep_value(bound.get("timestep"))
        if self._last_t is None or t is None or abs(t - self._last_t) > 1e-6:
            self._step += 1
            self._calls = 0
            self.stats.steps += 1
        else:
            self._calls += 1
        self._last_t = t
        try:
            if self.force_branch is not None:
                return self._run(self.force_branch, forward, args, kwargs)
            if self._calls >= 2:
                raise RuntimeError(
                    "FreeSwim saw a third transformer call at one timestep; it supports loops that call the "
                    "transformer once (conditional) or twice (conditional, unconditional) per step"
                )
            if self._calls == 1:
                return self._run(Branch.WINDOW_UNCOND, forward, args, kwargs)
            batch, tokens = hidden_states.shape[0], self._layout.total_tokens  # type: ignore[union-attr]
            if self._step % self.options.cache_every == 0 or not self._cache_fits(batch, tokens):
                self.stats.guide_steps.append(self._step)
                self.stats.full_forwards += 1
                self._run(Branch.FULL, forward, args, kwargs)
            return self._run(Branch.WINDOW_COND, forward, args, kwargs)
        finally:
            self.branch = Branch.OFF

    def _run(self, branch: Branch, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self.branch = branch
        window = self.stats._window()
        before = window.sparse_calls + window.dense_calls
        full_before = self.stats.full_self_attention_calls
        out = forward(*args, **kwargs)
        if branch is Branch.FULL:
            seen = self.stats.full_self_attention_calls > full_before
        else:
            self.stats.window_forwards += 1
            window = self.stats._window()
            seen = window.sparse_calls + window.dense_calls > before
            self.sites.end_forward()  # type: ignore[union-attr]
        if not seen:
            raise RuntimeError(
                "FreeSwim intercepted no self-attention call: the attention backend does not call "
                "torch.nn.functional.scaled_dot_product_attention (set the native backend)"
            )
        return out

    # -- attn1 -------------------------------------------------------------------------------------------------
    def _self_attention(self, site: int, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        bound = bind_sdpa(args, kwargs)
        if self.scale is not None and bound.get("scale") is None:
            bound["scale"] = self.scale
        if self.branch is Branch.FULL:
            self.stats.full_self_attention_calls += 1
            return func(**bound)
        assert self.sites is not None
        state = DenoiseState(
            step=self._step, branch=self.branch.value, layout=self._layout, timestep=self._last_t, active=True
        )
        return self.sites.site(site, f"blocks.{site}.attn1").attend(
            bound["query"], bound["key"], bound["value"], state=state, dense=lambda: func(**bound),
            scale=bound.get("scale"), attn_mask=bound.get("attn_mask"), is_causal=bool(bound.get("is_causal")),
            dropout_p=bound.get("dropout_p") or 0.0, enable_gqa=bool(bound.get("enable_gqa")),
        )  # fmt: skip

    # -- attn2 cache -------------------------------------------------------------------------------------------
    def _cache_fits(self, batch: int, tokens: int) -> bool:
        return all(c is not None and c.shape[0] == batch and c.shape[1] == tokens for c in self._cache)

    def _store(self, site: int, out: torch.Tensor) -> None:
        value = out.detach()
        dtype = self.options.torch_cache_dtype or value.dtype
        old = self._cache[site]
        if self.options.cache_offload:
            if old is not None and old.shape == value.shape and old.dtype == dtype and old.device.type == "cpu":
                old.copy_(value, non_blocking=True)
                value = old
            else:
                pin = value.device.type == "cuda"
                buf = torch.empty(value.shape, dtype=dtype, device="cpu", pin_memory=pin)
                buf.copy_(value, non_blocking=pin)
                value = buf
        else:
            value = value.to(dtype)
        self._cache[site] = value
        self.stats.attn2_computed += 1
        self.stats.cache_bytes = sum(c.numel() * c.element_size() for c in self._cache if c is not None)
        self.stats.cache_bytes_peak = max(self.stats.cache_bytes_peak, self.stats.cache_bytes)

    def _load(self, site: int, like: torch.Tensor) -> torch.Tensor:
        cached = self._cache[site]
        if cached is None:  # _forward guarantees a guide step first; this is a bug guard
            raise RuntimeError(f"FreeSwim: no cached cross-attention output for block {site}")
        self.stats.attn2_reused += 1
        return cached.to(device=like.device, dtype=like.dtype, non_blocking=True)


# ---------------------------------------------------------------------------------------------------------------
# upscaling


def upscale_video(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, F, h, w) frames resized bilinearly to (height, width) per frame (the official code's
    ``cv2.INTER_LINEAR``)."""
    b, c, f, h, w = video.shape
    frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    frames = F.interpolate(frames.float(), size=(height, width), mode="bilinear", align_corners=False)
    return frames.reshape(b, f, c, height, width).permute(0, 2, 1, 3, 4).to(video.dtype)


def upscale_latents(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, T, h, w) latents resized bilinearly per latent frame to (height, width) latent pixels."""
    return upscale_video(latents, height, width)


# ---------------------------------------------------------------------------------------------------------------
# the pipeline


#: set while :meth:`FreeSwimMixin.from_pipe` runs: the new pipeline's ``to(dtype=...)`` keeps the shared modules' dtypes
_KEEP_DTYPES: ContextVar[bool] = ContextVar("dit_accel_freeswim_keep_dtypes", default=False)


class FreeSwimMixin:
    """FreeSwim's stages, shared by every pipeline whose transformer is a Wan.

    A pipeline class mixes it in before its own, e.g. ``FreeSwimPipeline(FreeSwimMixin, WanPipeline)`` or the toy's
    ``ToyFreeSwimPipeline(FreeSwimMixin, ToyVideoPipeline)``, so ``super().__call__`` is that pipeline's plain pass
    (the base pass). Only the model-specific steps differ, as small methods a class overrides:
    :meth:`_make_refiner` (its video-to-video pipeline, whose ``prepare_latents`` encodes and noises the upscaled
    video), :meth:`decode_to_video` (latents to pixels for the frame upscale), ``vae_scale_factor_spatial`` and
    ``output_class``. Prompts go through the pipeline's own ``encode_prompt`` with its model-specific keywords
    (``max_sequence_length`` for Wan's T5). ``last_stats`` holds the last refinement's :class:`FreeSwimStats` as a dict.
    """

    last_stats: dict[str, Any] | None = None
    #: the class of the returned output (``frames`` = the video)
    output_class: type = WanPipelineOutput

    @classmethod
    def from_pipe(cls, pipeline: Any, **kwargs: Any) -> Any:
        """diffusers' ``from_pipe`` (the same component objects, nothing copied) that keeps every shared module's
        dtype unless ``torch_dtype`` is given: diffusers would cast them all to float32, changing the caller's
        pipeline (a bfloat16 transformer would double in size). The progress-bar settings carry over too."""
        if "torch_dtype" in kwargs or "dtype" in kwargs:
            new = super().from_pipe(pipeline, **kwargs)  # type: ignore[misc]
        else:
            token = _KEEP_DTYPES.set(True)
            try:
                new = super().from_pipe(pipeline, **kwargs)  # type: ignore[misc]
            finally:
                _KEEP_DTYPES.reset(token)
        new.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
        return new

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' ``to``, except the dtype cast that :meth:`from_pipe` makes of the shared modules."""
        if _KEEP_DTYPES.get() and not args and set(kwargs) == {"dtype"}:
            return self
        return super().to(*args, **kwargs)  # type: ignore[misc]

    # -- the model-specific steps ---------------------------------------------------------------------------------
    def _make_refiner(self, scheduler: Any) -> Any:
        """The video-to-video pipeline on this pipeline's components (``WanVideoToVideoPipeline``'s interface:
        ``scheduler``, ``get_timesteps``, ``prepare_latents``, and a call taking already noised ``latents``)."""
        raise NotImplementedError(f"{type(self).__name__} must say which video-to-video pipeline refines")

    def decode_to_video(self, latents: torch.Tensor) -> torch.Tensor:
        """The base pass's latents as a (B, C, F, H, W) video in [-1, 1], for the frame upscale."""
        raise NotImplementedError(f"{type(self).__name__} must say how its latents become frames")

    # -- shared ---------------------------------------------------------------------------------------------------
    def _refiner(self, options: FreeSwimOptions) -> Any:
        """The video-to-video pipeline with a fresh scheduler (its shift optional), so ours is never changed."""
        overrides: dict[str, Any] = {}
        if options.refine_shift is not None:
            key = "flow_shift" if "flow_shift" in self.scheduler.config else "shift"
            overrides[key] = float(options.refine_shift)
        scheduler = type(self.scheduler).from_config(self.scheduler.config, **overrides)
        refiner = self._make_refiner(scheduler)
        refiner.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return refiner

    def _check_supported(self) -> None:
        if getattr(self, "transformer_2", None) is not None or self.config.get("expand_timesteps", False):
            raise NotImplementedError(
                "FreeSwimPipeline supports single-transformer Wan text-to-video (Wan2.1, Wan2.2 T2V without "
                "transformer_2 / expand_timesteps); this pipeline has a second expert or per-token timesteps"
            )

    def _grid_of(self, height: int, width: int) -> tuple[int, int]:
        _, ph, pw = self.transformer.config.patch_size
        s = self.vae_scale_factor_spatial
        for name, value, p in (("height", height, ph), ("width", width, pw)):
            if value % (s * p):
                raise ValueError(f"{name}={value} must be a multiple of {s * p} (VAE factor {s} x patch {p})")
        return height // s // ph, width // s // pw

    def hooks_for(self, options: FreeSwimOptions, height: int, width: int) -> FreeSwimHooks:
        """The (not yet installed) hooks for a refinement at ``height`` x ``width``."""
        base_rows, base_cols = self._grid_of(options.base_height, options.base_width)
        self._grid_of(height, width)
        window = options.window_size or (base_rows, base_cols)
        scale = None
        if options.attention_scale:
            head_dim = self.transformer.config.attention_head_dim
            scale = freeswim_scale(base_rows * base_cols, head_dim)
        return FreeSwimHooks(self.transformer, window, options, scale=scale)

    @torch.no_grad()
    def prepare_refinement(
        self,
        base_latents: torch.Tensor,
        options: FreeSwimOptions,
        *,
        height: int,
        width: int,
        num_inference_steps: int,
        generator: torch.Generator | list[torch.Generator] | None = None,
        refiner: Any = None,
    ) -> torch.Tensor:
        """Upscale the base pass's (normalised) latents and noise them to the refinement's first timestep."""
        refiner = refiner or self._refiner(options)
        device = self._execution_device
        timesteps, _ = retrieve_timesteps(refiner.scheduler, num_inference_steps, device)
        timesteps, n_refine = refiner.get_timesteps(num_inference_steps, timesteps, options.strength, device)
        if n_refine < 1 or len(timesteps) == 0:
            raise ValueError(
                f"strength={options.strength} with num_inference_steps={num_inference_steps} leaves no refinement "
                "step; raise one of them"
            )
        batch = base_latents.shape[0]
        t0 = timesteps[:1].repeat(batch)
        s = self.vae_scale_factor_spatial
        if options.upscale == "latents":
            init = upscale_latents(base_latents.float(), height // s, width // s)
            noise = randn_tensor(init.shape, generator=generator, device=device, dtype=torch.float32)
            if hasattr(refiner.scheduler, "add_noise"):
                return refiner.scheduler.add_noise(init, noise, t0)
            return refiner.scheduler.scale_noise(init, t0, noise)
        video = upscale_video(self.decode_to_video(base_latents), height, width)
        return refiner.prepare_latents(
            video, batch, self.transformer.config.in_channels, height, width, torch.float32, device, generator,
            None, t0,
        )  # fmt: skip

    def refine(
        self,
        latents: torch.Tensor,
        options: FreeSwimOptions,
        *,
        height: int,
        width: int,
        num_inference_steps: int,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float = 5.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        refiner: Any = None,
    ) -> Any:
        """Video-to-video refinement of noised ``latents`` under FreeSwim's hooks; returns the video (or latents)."""
        refiner = refiner or self._refiner(options)
        hooks = self.hooks_for(options, height, width)
        extra: dict[str, Any] = {}
        if callback_on_step_end is not None:
            extra["callback_on_step_end"] = callback_on_step_end
            extra["callback_on_step_end_tensor_inputs"] = callback_on_step_end_tensor_inputs or ["latents"]
        with hooks:
            try:
                out = refiner(
                    latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                    height=height, width=width, num_inference_steps=num_inference_steps, strength=options.strength,
                    guidance_scale=guidance_scale, generator=generator, output_type=output_type, return_dict=False,
                    attention_kwargs=attention_kwargs, **extra,
                )[0]  # fmt: skip
            finally:
                self.last_stats = hooks.stats.as_dict()
                self.last_stats.update(
                    size=[height, width], base_size=[options.base_height, options.base_width],
                    strength=options.strength, cache_every=options.cache_every,
                )  # fmt: skip
                if hooks.geometry is not None:
                    geo = hooks.geometry
                    self.last_stats.update(
                        grid=list(geo.grid), window=list(geo.window), tile=list(geo.tile),
                        window_tiles=list(geo.extents), window_span=list(geo.span), scale=hooks.scale,
                    )  # fmt: skip
        return out

    def _freeswim_call(
        self,
        options: FreeSwimOptions,
        *,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        height: int,
        width: int,
        num_frames: int,
        num_inference_steps: int,
        guidance_scale: float,
        num_videos_per_prompt: int | None,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        output_type: str | None,
        return_dict: bool,
        attention_kwargs: dict[str, Any] | None,
        callback_on_step_end: Any,
        callback_on_step_end_tensor_inputs: list[str] | None,
        **model_kwargs: Any,
    ) -> Any:
        """The whole render: base pass (this pipeline's own call), upscale, FreeSwim refinement. ``model_kwargs``
        are the pipeline's own extra call arguments (``max_sequence_length`` for Wan), passed to its base pass and
        its ``encode_prompt``."""
        self._check_supported()
        common = dict(
            num_frames=num_frames, guidance_scale=guidance_scale, generator=generator,
            attention_kwargs=attention_kwargs, **model_kwargs,
        )  # fmt: skip
        if height <= options.base_height and width <= options.base_width and options.window_size is None:
            self.last_stats = None
            return super().__call__(  # type: ignore[misc]
                prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                num_inference_steps=num_inference_steps, num_videos_per_prompt=num_videos_per_prompt, latents=latents,
                prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
                return_dict=return_dict, callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"], **common,
            )  # fmt: skip
        self._grid_of(options.base_height, options.base_width)
        self._grid_of(height, width)
        # Encode once; both passes get the same (batch-expanded) embeddings.
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=guidance_scale > 1.0,
            num_videos_per_prompt=num_videos_per_prompt or 1,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            device=self._execution_device,
            **model_kwargs,
        )
        base = super().__call__(  # type: ignore[misc]
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, height=options.base_height,
            width=options.base_width, num_inference_steps=options.base_num_inference_steps or num_inference_steps,
            latents=latents, output_type="latent", return_dict=False, **common,
        )[0]  # fmt: skip
        refiner = self._refiner(options)
        noisy = self.prepare_refinement(
            base, options, height=height, width=width, num_inference_steps=num_inference_steps, generator=generator,
            refiner=refiner,
        )  # fmt: skip
        video = self.refine(
            noisy, options, height=height, width=width, num_inference_steps=num_inference_steps,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, guidance_scale=guidance_scale,
            generator=generator, output_type=output_type or "np", attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, refiner=refiner,
        )  # fmt: skip
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return self.output_class(frames=video)


class FreeSwimPipeline(FreeSwimMixin, WanPipeline):
    """``WanPipeline`` that renders above the training resolution with FreeSwim.

    Build it from a loaded pipeline (the same components, nothing copied): ``FreeSwimPipeline.from_pipe(pipe)``;
    ``from_pipe`` of the toy (a ``ToyVideoPipeline``: its transformer is a Wan, in pixel space) gives the toy's
    ``ToyFreeSwimPipeline``, which runs the same FreeSwim code. Call it like ``WanPipeline`` plus
    :class:`FreeSwimOptions`' fields (``base_height``, ``base_width``, ``strength``, ``cache_every``, ...). Targets no
    larger than the base resolution render with the plain Wan pass. ``last_stats`` holds the last refinement's
    :class:`FreeSwimStats` as a dict.
    """

    @classmethod
    def from_pipe(cls, pipeline: Any, **kwargs: Any) -> Any:
        """A FreeSwim pipeline on ``pipeline``'s components: this class for a Wan pipeline, the toy's
        ``ToyFreeSwimPipeline`` for a ``ToyVideoPipeline`` (no VAE, no T5: diffusers' own ``from_pipe`` could not
        build a ``WanPipeline`` from it)."""
        toy = _toy_freeswim_class(pipeline) if cls is FreeSwimPipeline else None
        if toy is not None:
            return toy.from_pipe(pipeline, **kwargs)
        return super().from_pipe(pipeline, **kwargs)

    def _make_refiner(self, scheduler: Any) -> WanVideoToVideoPipeline:
        """diffusers' own video-to-video pipeline on our components."""
        return WanVideoToVideoPipeline(
            tokenizer=self.tokenizer,
            text_encoder=self.text_encoder,
            vae=self.vae,
            scheduler=scheduler,
            transformer=self.transformer,
        )

    def decode_to_video(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's decode of the (normalised) latents, clamped to [-1, 1]."""
        vae = self.vae
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents.device, vae.dtype)
        return vae.decode(latents.to(vae.dtype) * std + mean, return_dict=False)[0].clamp(-1.0, 1.0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 1088,
        width: int = 1920,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        num_videos_per_prompt: int | None = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str | None = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 512,
        *,
        base_height: int = 480,
        base_width: int = 832,
        strength: float = 0.7,
        cache_every: int = 2,
        upscale: str = "frames",
        window_frames: int | None = None,
        window_size: tuple[int, int] | None = None,
        attention_scale: bool = True,
        block_size: int = 64,
        tile: tuple[int, int, int] | None = None,
        cache_dtype: str | torch.dtype | None = None,
        cache_offload: bool = False,
        refine_shift: float | None = None,
        base_num_inference_steps: int | None = None,
    ) -> WanPipelineOutput | tuple:
        """Base pass at ``base_height`` x ``base_width``, upscale, FreeSwim refinement at ``height`` x ``width``.

        ``latents`` are the base pass's initial noise; ``callback_on_step_end`` runs in the refinement. The other
        WanPipeline arguments mean what they mean there; FreeSwim's are documented on :class:`FreeSwimOptions`.
        """
        options = FreeSwimOptions(
            base_height=base_height, base_width=base_width, strength=strength, cache_every=cache_every,
            upscale=upscale, window_frames=window_frames, window_size=window_size, attention_scale=attention_scale,
            block_size=block_size, tile=tile, cache_dtype=cache_dtype, cache_offload=cache_offload,
            refine_shift=refine_shift, base_num_inference_steps=base_num_inference_steps,
        )  # fmt: skip
        return self._freeswim_call(
            options, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_frames=num_frames, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            num_videos_per_prompt=num_videos_per_prompt, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, output_type=output_type,
            return_dict=return_dict, attention_kwargs=attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )  # fmt: skip


def _toy_freeswim_class(pipeline: Any) -> type | None:
    """The toy's FreeSwim pipeline class when ``pipeline`` is the toy (imported only then), else None."""
    from ..toy.pipeline import ToyVideoPipeline

    if not isinstance(pipeline, ToyVideoPipeline):
        return None
    from ..toy.freeswim import ToyFreeSwimPipeline

    return ToyFreeSwimPipeline


def _call_default(pipe: Any, name: str, fallback: int) -> int:
    try:
        default = inspect.signature(pipe.__call__).parameters[name].default
    except (KeyError, TypeError, ValueError):
        return fallback
    return default if isinstance(default, int) and not isinstance(default, bool) else fallback


def maybe_freeswim(
    pipe: Any,
    request_kwargs: dict[str, Any],
    base_height: int | None,
    base_width: int | None,
    **freeswim_options: Any,
) -> tuple[Any, dict[str, Any]]:
    """``(pipe, kwargs)`` for a render request: a FreeSwim pipeline (same components) with ``base_height``,
    ``base_width`` and the non-None ``freeswim_options`` (e.g. ``strength``, ``cache_every``) added when the
    requested size exceeds the base resolution, else both unchanged.

    A missing target side is the pipeline's own default, a missing base side the target's. Raises ``ValueError``
    for a base size on a pipeline that is neither Wan text-to-video nor the toy.
    """
    if base_height is None and base_width is None:
        return pipe, request_kwargs
    if not isinstance(pipe, WanPipeline) and _toy_freeswim_class(pipe) is None:
        raise ValueError(
            f"--base-height/--base-width: FreeSwim high-resolution rendering needs a Wan text-to-video pipeline "
            f"or the toy (ToyVideoPipeline); got {type(pipe).__name__}"
        )
    height = request_kwargs.get("height") or _call_default(pipe, "height", 480)
    width = request_kwargs.get("width") or _call_default(pipe, "width", 832)
    base_h = base_height or height
    base_w = base_width or width
    if height <= base_h and width <= base_w:
        return pipe, request_kwargs
    extra = {k: v for k, v in freeswim_options.items() if v is not None}
    FreeSwimOptions(base_height=base_h, base_width=base_w, **extra)  # fail early, naming the bad option
    out = dict(request_kwargs, height=height, width=width, base_height=base_h, base_width=base_w, **extra)
    return FreeSwimPipeline.from_pipe(pipe), out

"""ComfyUI node "DiT Sparse Attention": dit_accel's methods behind ComfyUI's attention override.

ComfyUI routes every attention call made through ``optimized_attention`` to
``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` when one is set. This node clones
the MODEL and installs an override that runs self-attention in the step window through a dit_accel method
(``dit_accel.methods.build_method``: the same pattern, compensation and kernels as the diffusers path) and hands
every call it declines (cross-attention, masks, dense blocks, short sequences, steps outside the window, the
method's own schedule) to the override that was there before, or to ComfyUI's ``func``.

Only this module imports ``comfy`` (lazily, when a node runs); the dit_accel core never does.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

# Absolute imports: when this folder is loaded as a ComfyUI custom node it is a top-level package of its own.
from dit_accel.config import DEFAULT_METHOD, METHODS, PRESETS, AccelConfig, resolve_config
from dit_accel.core import SiteGroup
from dit_accel.layout import TokenLayout
from dit_accel.state import DenoiseState

__all__ = [
    "KEY",
    "DiTSparseAttention",
    "SparseAttentionPatch",
    "apply_sparse_attention",
    "step_from_sigmas",
]

KEY = "dit_accel_sparse_attention"
OVERRIDE = "optimized_attention_override"
NODE_ID = "DiTSparseAttention"
DISPLAY_NAME = "DiT Sparse Attention"
CATEGORY = "model/patch"

log = logging.getLogger("dit_accel.comfyui")


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        return float(value.detach().float().max())
    return float(value)


def step_from_sigmas(sigma: Any, sample_sigmas: Any) -> tuple[int | None, int | None]:
    """(step index, number of steps) of the current sigma in the sampler's schedule (None when unknown).

    An exact match is taken first; otherwise the interval of the schedule holding ``sigma``.
    """
    t = _scalar(sigma)
    if t is None or sample_sigmas is None:
        return None, None
    schedule = [float(s) for s in torch.as_tensor(sample_sigmas).detach().float().flatten().tolist()]
    if len(schedule) < 2:
        return None, None
    steps = len(schedule) - 1
    for i, s in enumerate(schedule[:-1]):
        if math.isclose(s, t, rel_tol=1e-5, abs_tol=1e-7):
            return i, steps
    for i in range(steps):
        if (schedule[i] - t) * (schedule[i + 1] - t) <= 0:
            return i, steps
    return None, steps


class SparseAttentionPatch:
    """State and logic behind one node instance: decides per call, keeps per-block caches, counts decisions."""

    def __init__(
        self,
        config: AccelConfig,
        *,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        sigma_start: float | None = None,
        sigma_end: float | None = None,
        verbose: bool = False,
    ) -> None:
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"start_percent={start_percent}, end_percent={end_percent}: need 0 <= start <= end <= 1")
        self.config = config
        # the site core (dense decision, schedule, per-block state, stats); the grid check below stands for the
        # layout, and anything beside the latent grid may be text, so a missing layout stays dense
        self.sites = SiteGroup(config, text_tokens=True)
        self.start_percent = float(start_percent)
        self.end_percent = float(end_percent)
        self.sigma_start = sigma_start
        self.sigma_end = sigma_end
        self.verbose = verbose
        self.previous: Callable[..., Any] | None = None
        self.grid: tuple[int, int, int] | None = None
        self.self_calls = 0
        self.generation = 0
        self._last_step = -1
        self._logged: set[str] = set()
        self._declined: Counter = Counter()
        self._local = threading.local()
        self.override = self._make_override()

    # ----------------------------------------------------------------------------------------- installation
    def _make_override(self) -> Callable[..., Any]:
        patch = self

        def dit_accel_override(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return patch(func, *args, **kwargs)

        # A plain function (not a bound method): ComfyUI deep-copies model_options on clone, and functions are
        # copied by reference, so every clone of the patched model keeps talking to this one patch.
        dit_accel_override._dit_accel_patch = patch  # type: ignore[attr-defined]
        return dit_accel_override

    def install(self, transformer_options: dict[str, Any]) -> None:
        """Put our override on top, remembering the current one as the fallback (idempotent)."""
        current = transformer_options.get(OVERRIDE)
        if current is self.override:
            return
        self.previous = current
        transformer_options[OVERRIDE] = self.override

    @property
    def method(self) -> Any:
        return self.sites.method

    @property
    def sparse_calls(self) -> int:
        """Calls that ran through dit_accel (sparse or refresh)."""
        overall = self.sites.stats()["overall"]
        return overall["sparse_calls"] + overall["refresh_calls"]

    @property
    def dense_reasons(self) -> Counter:
        """Calls handed back to ComfyUI, by reason (``dit_accel.core.DENSE_REASONS``)."""
        total: Counter = Counter(self._declined)
        for site in self.sites.sites:
            total.update(site.stats.dense_reasons)
        return total

    def reset(self) -> None:
        """Forget caches and the step position (a sampling run ended)."""
        self.sites.new_generation()
        self.grid = None
        self.self_calls = 0
        self._last_step = -1

    def stats(self) -> dict[str, Any]:
        reasons = self.dense_reasons
        return {
            "method": self.config.method,
            "sparse_calls": self.sparse_calls,
            "dense_calls": sum(reasons.values()),
            "dense_reasons": dict(reasons),
            "block_density": self.sites.stats()["overall"]["block_density"],
        }

    # ----------------------------------------------------------------------------------------- callbacks
    def diffusion_model_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """``WrappersMP.DIFFUSION_MODEL``: read the latent grid from ``x`` [B, C, F, H, W] and start a forward."""
        x = args[0] if args else kwargs.get("x")
        model = getattr(executor, "class_obj", None)
        patch = getattr(model, "patch_size", None) or (1, 2, 2)
        patch = tuple(int(p) for p in patch) if isinstance(patch, (tuple, list)) else (1, int(patch), int(patch))
        if isinstance(x, torch.Tensor) and x.dim() == 5:
            f, h, w = x.shape[2:]
            self.grid = (math.ceil(f / patch[0]), math.ceil(h / patch[1]), math.ceil(w / patch[2]))
        elif isinstance(x, torch.Tensor) and x.dim() == 4:
            h, w = x.shape[2:]
            self.grid = (1, math.ceil(h / patch[-2]), math.ceil(w / patch[-1]))
        else:
            self.grid = None
        self.self_calls = 0
        return executor(*args, **kwargs)

    def on_prepare_state(self, patcher: Any, *args: Any, **kwargs: Any) -> None:
        """``CallbacksMP.ON_PREPARE_STATE``: re-install on top, so a later node cannot silently replace us."""
        options = kwargs.get("model_options")
        if options is None:
            options = next((a for a in args if isinstance(a, dict)), None)
        targets = [getattr(patcher, "model_options", None), options]
        for target in targets:
            if isinstance(target, dict):
                self.install(target.setdefault("transformer_options", {}))

    def on_cleanup(self, *args: Any, **kwargs: Any) -> None:
        """``CallbacksMP.ON_CLEANUP``: drop per-run state."""
        self.reset()

    # ----------------------------------------------------------------------------------------- attention
    def _decline(self, reason: str, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        """Calls that never reach a site (not attention the core can read) are counted here."""
        self._declined[reason] += 1
        return self._fallback(reason, func, args, kwargs)

    def _fallback(self, reason: str, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        if self.verbose:
            self._log(reason)
        return self._raw(func, args, kwargs)

    def _log(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.info("dit_accel: attention stays dense (%s)", reason)

    def _in_window(self, sigma: float | None, step: int | None, steps: int | None) -> bool:
        if sigma is not None and self.sigma_start is not None and self.sigma_end is not None:
            # sigmas arrive as float32 tensors: a sigma on the window's edge may read a few ulps outside it
            tol = 1e-6 * max(1.0, abs(sigma))
            return self.sigma_end - tol <= sigma <= self.sigma_start + tol
        if step is None or not steps:
            return True
        fraction = step / steps
        return self.start_percent <= fraction and (fraction < self.end_percent or self.end_percent >= 1.0)

    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if getattr(self._local, "busy", False):  # a foreign override chained on top of us called back in
            return func(*args, **kwargs)
        self._local.busy = True
        try:
            return self._attend(func, args, kwargs)
        finally:
            self._local.busy = False

    def _attend(self, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        names = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        q, k, v, heads = bound.get("q"), bound.get("k"), bound.get("v"), bound.get("heads")
        options = kwargs.get("transformer_options") or {}
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or heads is None:
            return self._decline("layout", func, args, kwargs)
        if q.shape != k.shape or k.shape[:-1] != v.shape[:-1]:
            return self._decline("cross_attention", func, args, kwargs)
        block = options.get("block_index")
        if block is None:
            block = self.self_calls
        self.self_calls += 1
        skip_reshape = bool(bound.get("skip_reshape", False))
        if skip_reshape:
            qh, kh, vh = q, k, v  # (B, H, S, D)
        else:
            b, s, _ = q.shape
            qh, kh, vh = (t.view(b, s, int(heads), -1).transpose(1, 2) for t in (q, k, v))
        sigma = _scalar(options.get("sigmas"))
        step, steps = step_from_sigmas(options.get("sigmas"), options.get("sample_sigmas"))
        reason = None if self._in_window(sigma, step, steps) else "outside_window"
        if step is not None and step < self._last_step:
            self.sites.new_generation()  # a new sampling run started without a clean-up
            self.generation += 1
        if step is not None:
            self._last_step = step
        branch = "-".join(str(c) for c in options.get("cond_or_uncond", [])) or "pass0"
        tokens = qh.shape[2]
        grid = self.grid
        layout = TokenLayout(grid=grid) if grid is not None and grid[0] * grid[1] * grid[2] == tokens else None
        state = DenoiseState(
            step=step if step is not None else 0, num_steps=steps, branch=branch, generation=self.generation,
            timestep=sigma, layout=layout, active=True,
        )  # fmt: skip

        def to_caller(out: torch.Tensor) -> torch.Tensor:
            out = out.to(q.dtype)
            if bool(bound.get("skip_output_reshape", False)):
                return out
            b, h, s, d = out.shape
            return out.transpose(1, 2).reshape(b, s, h * d)

        site = self.sites.site(int(block), f"blocks.{block}")
        before = Counter(site.stats.dense_reasons)
        out = site.attend(
            qh, kh, vh, state=state, dense=lambda: self._raw(func, args, kwargs), attn_mask=bound.get("mask"),
            reason=reason, to_caller=to_caller,
        )  # fmt: skip
        if self.verbose:
            for why in site.stats.dense_reasons - before:
                self._log(why)
        return out

    def _raw(self, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)


def apply_sparse_attention(
    model: Any,
    method: str | None = None,
    sparsity: float | None = None,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    dense_blocks: str = "",
    min_tokens: int = 0,
    *,
    verbose: bool = False,
    **options: Any,
) -> Any:
    """A clone of the ComfyUI ``ModelPatcher`` ``model`` with dit_accel sparse self-attention installed.

    ``sparsity`` < 0 or None keeps the preset's own value; ``dense_blocks`` takes indices and ranges like
    ``"0, 1, 28-29"``; ``options`` are any other :class:`~dit_accel.AccelConfig` fields.
    """
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    settings = dict(options)
    if sparsity is not None and sparsity >= 0:
        settings["sparsity"] = float(sparsity)
    settings["min_tokens"] = int(min_tokens)
    settings["dense_layers"] = dense_blocks or ()
    config = resolve_config(method, **settings)
    sigma_start = sigma_end = None
    try:
        sampling = model.get_model_object("model_sampling")
        sigma_start = float(sampling.percent_to_sigma(start_percent))
        sigma_end = float(sampling.percent_to_sigma(end_percent))
    except Exception:  # noqa: BLE001 - no model_sampling: fall back to the step fraction
        pass
    patch = SparseAttentionPatch(
        config,
        start_percent=start_percent,
        end_percent=end_percent,
        sigma_start=sigma_start,
        sigma_end=sigma_end,
        verbose=verbose,
    )
    patched = model.clone()
    patch.install(patched.model_options.setdefault("transformer_options", {}))
    patched.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, KEY, _function(patch.diffusion_model_wrapper))
    patched.add_callback_with_key(CallbacksMP.ON_PREPARE_STATE, KEY, _function(patch.on_prepare_state))
    patched.add_callback_with_key(CallbacksMP.ON_CLEANUP, KEY, _function(patch.on_cleanup))
    return patched


def _function(bound: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a bound method in a plain function so ComfyUI's deep copies share, not copy, the patch."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return bound(*args, **kwargs)

    call._dit_accel_patch = getattr(bound, "__self__", None)  # type: ignore[attr-defined]
    return call


def _method_choices() -> list[str]:
    import dit_accel  # noqa: F401 - importing the package registers every method's preset

    return list(METHODS)


_TOOLTIPS = {
    "method": "dit_accel method (preset of pattern x compensation x schedule); '-paper' = published defaults.",
    "sparsity": "Fraction of key blocks skipped per query block; -1 keeps the preset's value.",
    "start_percent": "Sampling progress where sparse attention starts (earlier steps stay dense).",
    "end_percent": "Sampling progress where sparse attention stops.",
    "dense_blocks": "Transformer blocks kept dense, e.g. '0, 1, 28-29'.",
    "min_tokens": "Sequences shorter than this stay dense.",
}


class DiTSparseAttention:
    """V1 node: MODEL in, patched MODEL out."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 - ComfyUI's name
        methods = _method_choices()
        return {
            "required": {
                "model": ("MODEL",),
                "method": (methods, {"default": DEFAULT_METHOD, "tooltip": _TOOLTIPS["method"]}),
                "sparsity": (
                    "FLOAT",
                    {"default": 0.9, "min": -1.0, "max": 0.99, "step": 0.01, "tooltip": _TOOLTIPS["sparsity"]},
                ),
                "start_percent": (
                    "FLOAT",
                    {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": _TOOLTIPS["start_percent"]},
                ),
                "end_percent": (
                    "FLOAT",
                    {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": _TOOLTIPS["end_percent"]},
                ),
                "dense_blocks": ("STRING", {"default": "0", "tooltip": _TOOLTIPS["dense_blocks"]}),
                "min_tokens": (
                    "INT",
                    {"default": 4096, "min": 0, "max": 1 << 24, "step": 64, "tooltip": _TOOLTIPS["min_tokens"]},
                ),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = "Step-aware sparse self-attention from dit_accel for DiT video models (Wan and friends)."
    EXPERIMENTAL = True

    def patch(
        self,
        model: Any,
        method: str,
        sparsity: float,
        start_percent: float,
        end_percent: float,
        dense_blocks: str,
        min_tokens: int,
    ) -> tuple[Any]:
        return (apply_sparse_attention(model, method, sparsity, start_percent, end_percent, dense_blocks, min_tokens),)


def preset_default_sparsity(method: str) -> float | None:
    """The preset's own sparsity (shown in docs; the node's -1 keeps it)."""
    return PRESETS[method].pattern.sparsity if method in PRESETS else None


def v3_extension() -> Any:
    """The ``comfy_api.latest`` extension holding the V3 node, or None when that API is unavailable."""
    try:
        from comfy_api.latest import ComfyExtension, io
    except ImportError:
        return None

    class DiTSparseAttentionV3(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> Any:
            return io.Schema(
                node_id=NODE_ID,
                display_name=DISPLAY_NAME,
                category=CATEGORY,
                description=DiTSparseAttention.DESCRIPTION,
                is_experimental=True,
                inputs=[
                    io.Model.Input("model"),
                    io.Combo.Input("method", options=_method_choices(), default=DEFAULT_METHOD),
                    io.Float.Input("sparsity", default=0.9, min=-1.0, max=0.99, step=0.01),
                    io.Float.Input("start_percent", default=0.2, min=0.0, max=1.0, step=0.01),
                    io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01),
                    io.String.Input("dense_blocks", default="0"),
                    io.Int.Input("min_tokens", default=4096, min=0, max=1 << 24, step=64),
                ],
                outputs=[io.Model.Output()],
            )

        @classmethod
        def execute(cls, model, method, sparsity, start_percent, end_percent, dense_blocks, min_tokens) -> Any:
            patched = apply_sparse_attention(
                model, method, sparsity, start_percent, end_percent, dense_blocks, min_tokens
            )
            return io.NodeOutput(patched)

    class DitAccelExtension(ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return [DiTSparseAttentionV3]

    return DitAccelExtension()

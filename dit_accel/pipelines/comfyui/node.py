"""ComfyUI node "DiT Sparse Attention": dit_accel's methods behind ComfyUI's attention override.

ComfyUI routes every attention call made through ``optimized_attention`` to
``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` when one is set. This node clones
the MODEL and installs an override that runs self-attention in the step window through a dit_accel method
(``dit_accel.methods.build_method``: the same pattern, compensation and kernels as the diffusers path) and hands
every call it declines (cross-attention, masks, dense blocks, short sequences, steps outside the window, the
method's own schedule) to the override that was there before, or to ComfyUI's ``func``.

What belongs to one model lives in that model's ``transformer_options`` (the fallback override), what belongs to
one transformer forward lives in the forward's own ``transformer_options`` (sigma, step, latent grid, an override
a later node put on top), so clones of the patched model never see each other's state. The dense decision, the
schedule, per-block caches and stats live in the site core (:class:`dit_accel.core.SiteGroup`).

Only this module imports ``comfy`` (lazily, when a node runs); the dit_accel core never does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Absolute imports: when this folder is loaded as a ComfyUI custom node it is a top-level package of its own.
from dit_accel.config import DEFAULT_METHOD, METHODS, PRESETS, AccelConfig, parse_layers, resolve_config
from dit_accel.core import SiteGroup
from dit_accel.layout import TokenLayout
from dit_accel.parts import ScheduleConfig
from dit_accel.state import DenoiseState

__all__ = [
    "KEY",
    "DiTSparseAttention",
    "SparseAttentionPatch",
    "apply_sparse_attention",
    "step_from_sigmas",
    "validate_node_inputs",
]

KEY = "dit_accel_sparse_attention"
OVERRIDE = "optimized_attention_override"
#: ``transformer_options[FALLBACKS][patch token]``: the override that was below ours when the node ran (per model)
FALLBACKS = "dit_accel_fallbacks"
#: ``transformer_options[FORWARDS][patch token]``: the :class:`_Forward` of the transformer forward running now
FORWARDS = "dit_accel_forwards"
NODE_ID = "DiTSparseAttention"
DISPLAY_NAME = "DiT Sparse Attention"
CATEGORY = "model/patch"
#: float32 sigmas and percent_to_sigma's float64 edges differ by rounding: this many float32 ulps count as equal
EDGE_ULPS = 8
#: the node's ``min_tokens`` default: the API's own (``ScheduleConfig.min_tokens``, what ``accelerate`` uses), so the
#: node and ``dit_accel.accelerate`` keep the same sequences dense unless told otherwise
DEFAULT_MIN_TOKENS: int = {f.name: f.default for f in dataclasses.fields(ScheduleConfig)}["min_tokens"]

log = logging.getLogger("dit_accel.comfyui")


def _scalar(value: Any) -> float | None:
    """One number from ComfyUI's ``sigmas`` (a tensor of one sigma per batch row): a host sync for a tensor."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        return float(value.detach().float().max())
    return float(value)


def _match_step(t: float, schedule: list[float]) -> tuple[int | None, int | None]:
    """(step, steps) of sigma ``t`` in a host copy of the schedule: an exact match first, else its interval."""
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


def _host_list(values: Any) -> list[float]:
    return [float(s) for s in torch.as_tensor(values).detach().float().flatten().tolist()]


def step_from_sigmas(sigma: Any, sample_sigmas: Any) -> tuple[int | None, int | None]:
    """(step index, number of steps) of the current sigma in the sampler's schedule (None when unknown).

    An exact match is taken first; otherwise the interval of the schedule holding ``sigma``. This reads both to
    the host; the node itself does it once per transformer forward and caches the schedule.
    """
    t = _scalar(sigma)
    if t is None or sample_sigmas is None:
        return None, None
    return _match_step(t, _host_list(sample_sigmas))


def in_sigma_window(sigma: float, sigma_start: float, sigma_end: float) -> bool:
    """Whether ``sigma`` lies in ``[sigma_end, sigma_start]``, both edges included (ComfyUI's timestep ranges).

    Sigmas reach the model as float32 tensors while ``percent_to_sigma`` returns a Python float, so a sigma
    computed for the edge may read a few float32 ulps outside it; that much counts as on the edge.
    """
    eps = EDGE_ULPS * 2.0**-23  # float32 machine epsilon x ulps, relative
    return sigma_end * (1 - eps) - 1e-12 <= sigma <= sigma_start * (1 + eps) + 1e-12


def validate_node_inputs(start_percent: Any, end_percent: Any, dense_blocks: Any) -> bool | str:
    """ComfyUI's validation convention (V1 ``VALIDATE_INPUTS``, V3 ``validate_inputs``): True, or a message.

    ComfyUI skips its own min/max check of every input a validation function takes, so the range is checked here.
    ``dense_blocks`` goes through the config's own parser (:func:`dit_accel.config.parse_layers`), so the node and
    the library accept the same strings.
    """
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            return f"{name}={value!r} must be a number in [0, 1]"
    if start_percent > end_percent:
        return (
            f"start_percent={start_percent!r} is after end_percent={end_percent!r}; sparse attention runs from "
            "start_percent to end_percent, so start_percent must not exceed end_percent"
        )
    if not isinstance(dense_blocks, str):
        return f"dense_blocks={dense_blocks!r} must be a string of block indices and ranges like '0, 1, 28-29'"
    try:
        parse_layers(dense_blocks, "dense_blocks")
    except ValueError as error:
        return str(error)
    return True


def _check_inputs(start_percent: Any, end_percent: Any, dense_blocks: Any) -> None:
    verdict = validate_node_inputs(start_percent, end_percent, dense_blocks)
    if verdict is not True:
        raise ValueError(verdict)


@dataclass
class _Forward:
    """What one transformer forward shares with its attention calls (read once: no host sync per call)."""

    sigma: float | None
    step: int | None
    steps: int | None
    reason: str | None  # "outside_window" or None
    grid: tuple[int, int, int] | None = None
    above: Callable[..., Any] | None = None  # an override a later node put on top, moved below ours
    calls: int = 0  # self-attention calls so far (block index when transformer_options has none)


class SparseAttentionPatch:
    """The logic behind one node instance, shared by every clone of the patched model.

    It holds the site core and caches derived from the model being sampled (the sigma window, the host copy of the
    schedule); what differs between clones (the fallback override) is read from each call's ``transformer_options``.
    """

    def __init__(
        self,
        config: AccelConfig,
        *,
        start_percent: float = 0.0,
        end_percent: float = 1.0,
        verbose: bool = False,
    ) -> None:
        verdict = validate_node_inputs(start_percent, end_percent, "")
        if verdict is not True:
            raise ValueError(verdict)
        self.config = config
        # the site core (dense decision, schedule, per-block state, stats); the grid check below stands for the
        # layout, and anything beside the latent grid may be text, so a missing layout stays dense
        self.sites = SiteGroup(config, text_tokens=True)
        self.start_percent = float(start_percent)
        self.end_percent = float(end_percent)
        self.verbose = verbose
        self.token = uuid.uuid4().hex  # this patch's key in transformer_options[FALLBACKS] / [FORWARDS]
        self.generation = 0
        self.window: tuple[float, float] | None = None  # (sigma_start, sigma_end) of the model being sampled
        self._sampling: Any = None  # the model_sampling object ``window`` was computed from
        self._schedule: tuple[torch.Tensor, int, list[float]] | None = None  # (tensor, version, host copy)
        self._loose: tuple[Any, Any, int, _Forward] | None = None  # a forward seen without our wrapper
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
        """Put our override on top of a model's ``transformer_options``; the one there becomes this model's
        fallback (stored in the same dict, so each clone keeps its own). Idempotent."""
        current = transformer_options.get(OVERRIDE)
        if current is self.override:
            return
        fallbacks = dict(transformer_options.get(FALLBACKS) or {})  # a new dict: never edit one a clone shares
        fallbacks[self.token] = current
        transformer_options[FALLBACKS] = fallbacks
        transformer_options[OVERRIDE] = self.override

    def fallback(self, transformer_options: dict[str, Any]) -> Callable[..., Any] | None:
        """The override below ours in this model's (or this forward's) ``transformer_options``."""
        return (transformer_options.get(FALLBACKS) or {}).get(self.token)

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
        """Forget caches, the step position and the sampled model's window (a sampling run ended)."""
        self.sites.new_generation()
        self._last_step = -1
        self.window = None
        self._sampling = None
        self._loose = None

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
    def on_prepare_state(self, patcher: Any, *args: Any, **kwargs: Any) -> None:
        """``CallbacksMP.ON_PREPARE_STATE`` (ComfyUI calls ``callback(patcher, timestep)`` before each step's model
        calls, on the patcher being sampled): the start/end percent become sigmas of *that* model's
        ``model_sampling``, so a shift node (ModelSamplingSD3) placed after this node counts."""
        try:
            sampling = patcher.get_model_object("model_sampling")
        except Exception:  # noqa: BLE001 - no model_sampling: the window falls back to the step fraction
            sampling = None
        if sampling is self._sampling and (sampling is None or self.window is not None):
            return
        self._sampling = sampling
        self.window = None
        if sampling is not None and hasattr(sampling, "percent_to_sigma"):
            start = float(sampling.percent_to_sigma(self.start_percent))
            end = float(sampling.percent_to_sigma(self.end_percent))
            self.window = (start, end)

    def on_cleanup(self, *args: Any, **kwargs: Any) -> None:
        """``CallbacksMP.ON_CLEANUP``: drop per-run state."""
        self.reset()

    def diffusion_model_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """``WrappersMP.DIFFUSION_MODEL``: read sigma, step and latent grid once for the forward, and keep our
        override on top of this forward's ``transformer_options`` (a later node's override goes below it)."""
        options = _forward_options(args, kwargs)
        if options is None:
            return executor(*args, **kwargs)
        forward = self._begin_forward(options, args[0] if args else kwargs.get("x"), executor)
        current = options.get(OVERRIDE)
        saved_override, had_override = current, OVERRIDE in options
        saved_forwards, had_forwards = options.get(FORWARDS), FORWARDS in options
        if current is not self.override and getattr(current, "_dit_accel_patch", None) is None:
            # a later node replaced (or wrapped) ours: run ours first and hand declined calls to it; another
            # dit_accel override is left alone, it chains to us through its own fallback
            forward.above = current
            options[OVERRIDE] = self.override
        options[FORWARDS] = {**(saved_forwards or {}), self.token: forward}
        try:
            return executor(*args, **kwargs)
        finally:  # nothing stays behind in the dict, even when it is the model's own
            for key, had, value in ((OVERRIDE, had_override, saved_override), (FORWARDS, had_forwards, saved_forwards)):
                if had:
                    options[key] = value
                else:
                    options.pop(key, None)

    def _begin_forward(self, options: dict[str, Any], x: Any, executor: Any) -> _Forward:
        forward = self._read_step(options)
        model = getattr(executor, "class_obj", None)
        patch = getattr(model, "patch_size", None) or (1, 2, 2)
        patch = tuple(int(p) for p in patch) if isinstance(patch, (tuple, list)) else (1, int(patch), int(patch))
        if isinstance(x, torch.Tensor) and x.dim() == 5:
            f, h, w = x.shape[2:]
            forward.grid = (math.ceil(f / patch[0]), math.ceil(h / patch[1]), math.ceil(w / patch[2]))
        elif isinstance(x, torch.Tensor) and x.dim() == 4:
            h, w = x.shape[2:]
            forward.grid = (1, math.ceil(h / patch[-2]), math.ceil(w / patch[-1]))
        return forward

    def _read_step(self, options: dict[str, Any]) -> _Forward:
        """Sigma (one host sync), step (from a host copy of the schedule, made once per schedule tensor), window."""
        sigma = _scalar(options.get("sigmas"))
        step = steps = None
        schedule = self._host_schedule(options.get("sample_sigmas"))
        if sigma is not None and schedule is not None:
            step, steps = _match_step(sigma, schedule)
        if step is not None:
            if step < self._last_step:
                self.sites.new_generation()  # a new sampling run started without a clean-up
                self.generation += 1
            self._last_step = step
        reason = None if self._in_window(sigma, step, steps) else "outside_window"
        return _Forward(sigma=sigma, step=step, steps=steps, reason=reason)

    def _host_schedule(self, sample_sigmas: Any) -> list[float] | None:
        if sample_sigmas is None:
            return None
        if not isinstance(sample_sigmas, torch.Tensor):
            return _host_list(sample_sigmas)
        cached = self._schedule
        if cached is None or cached[0] is not sample_sigmas or cached[1] != sample_sigmas._version:
            cached = (sample_sigmas, sample_sigmas._version, _host_list(sample_sigmas))
            self._schedule = cached
        return cached[2]

    def _in_window(self, sigma: float | None, step: int | None, steps: int | None) -> bool:
        if sigma is not None and self.window is not None:
            return in_sigma_window(sigma, *self.window)
        if step is None or not steps:
            return True
        fraction = step / steps
        return self.start_percent <= fraction and (fraction < self.end_percent or self.end_percent >= 1.0)

    def _forward_of(self, options: dict[str, Any]) -> _Forward:
        """This call's forward: the one our wrapper set up, else one read from ``options`` (cached per options dict
        and sigmas tensor, so calls of one forward share it; no latent grid, so self-attention stays dense)."""
        forward = (options.get(FORWARDS) or {}).get(self.token)
        if forward is not None:
            return forward
        sigmas = options.get("sigmas")
        version = sigmas._version if isinstance(sigmas, torch.Tensor) else 0
        loose = self._loose
        if loose is None or loose[0] is not options or loose[1] is not sigmas or loose[2] != version:
            loose = (options, sigmas, version, self._read_step(options))
            self._loose = loose
        return loose[3]

    # ----------------------------------------------------------------------------------------- attention
    def __call__(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        options = kwargs.get("transformer_options") or {}
        if getattr(self._local, "busy", False):  # the override above ours called back in: go on below
            return self._call(self.fallback(options), func, args, kwargs)
        self._local.busy = True
        try:
            return self._attend(func, args, kwargs, options)
        finally:
            self._local.busy = False

    def _decline(self, reason: str, dense: Callable[[], Any]) -> Any:
        """Calls that never reach a site (not attention the core can read) are counted here."""
        self._declined[reason] += 1
        if self.verbose:
            self._log(reason)
        return dense()

    def _log(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.info("dit_accel: attention stays dense (%s)", reason)

    def _attend(self, func: Callable[..., Any], args: tuple, kwargs: dict[str, Any], options: dict[str, Any]) -> Any:
        names = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        q, k, v, heads = bound.get("q"), bound.get("k"), bound.get("v"), bound.get("heads")
        forward = self._forward_of(options)
        target = forward.above or self.fallback(options)

        def dense() -> Any:
            return self._call(target, func, args, kwargs)

        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or heads is None:
            return self._decline("layout", dense)
        if q.shape != k.shape or k.shape[:-1] != v.shape[:-1]:
            return self._decline("cross_attention", dense)
        block = options.get("block_index")
        if block is None:
            block = forward.calls
        forward.calls += 1
        skip_reshape = bool(bound.get("skip_reshape", False))
        if skip_reshape:
            qh, kh, vh = q, k, v  # (B, H, S, D)
        else:
            b, s, _ = q.shape
            qh, kh, vh = (t.view(b, s, int(heads), -1).transpose(1, 2) for t in (q, k, v))
        branch = "-".join(str(c) for c in options.get("cond_or_uncond", [])) or "pass0"
        tokens = qh.shape[2]
        grid = forward.grid
        layout = TokenLayout(grid=grid) if grid is not None and grid[0] * grid[1] * grid[2] == tokens else None
        state = DenoiseState(
            step=forward.step if forward.step is not None else 0, num_steps=forward.steps, branch=branch,
            generation=self.generation, timestep=forward.sigma, layout=layout, active=True,
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
            qh, kh, vh, state=state, dense=dense, attn_mask=bound.get("mask"), reason=forward.reason,
            to_caller=to_caller,
        )  # fmt: skip
        if self.verbose:
            for why in site.stats.dense_reasons - before:
                self._log(why)
        return out

    @staticmethod
    def _call(target: Callable[..., Any] | None, func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if target is not None:
            return target(func, *args, **kwargs)
        return func(*args, **kwargs)


def _forward_options(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The ``transformer_options`` a ``DIFFUSION_MODEL`` wrapper received: a keyword, or the positional dict that
    carries our fallbacks (models pass it in different positions: Wan 6th, Flux 8th, ...)."""
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    for arg in args:
        if isinstance(arg, dict) and (FALLBACKS in arg or OVERRIDE in arg):
            return arg
    return None


def apply_sparse_attention(
    model: Any,
    method: str | None = None,
    sparsity: float | None = None,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    dense_blocks: str = "",
    min_tokens: int | None = None,
    *,
    verbose: bool = False,
    **options: Any,
) -> Any:
    """A clone of the ComfyUI ``ModelPatcher`` ``model`` with dit_accel sparse self-attention installed.

    ``sparsity`` < 0 or None keeps the preset's own value, and so does ``min_tokens=None`` (the API's default,
    :data:`DEFAULT_MIN_TOKENS`, which is also the node's); ``dense_blocks`` takes indices and ranges like
    ``"0, 1, 28-29"``; ``options`` are any other :class:`~dit_accel.AccelConfig` fields. The start/end percent
    become sigmas when sampling starts, from the model being sampled
    (:meth:`SparseAttentionPatch.on_prepare_state`).
    """
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    _check_inputs(start_percent, end_percent, dense_blocks)
    settings = dict(options)
    if sparsity is not None and sparsity >= 0:
        settings["sparsity"] = float(sparsity)
    if min_tokens is not None:
        settings["min_tokens"] = int(min_tokens)
    settings["dense_layers"] = parse_layers(dense_blocks, "dense_blocks")
    config = resolve_config(method, **settings)
    patch = SparseAttentionPatch(config, start_percent=start_percent, end_percent=end_percent, verbose=verbose)
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
    "min_tokens": f"Sequences shorter than this stay dense (default {DEFAULT_MIN_TOKENS}, as in dit_accel.accelerate).",
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
                    {
                        "default": DEFAULT_MIN_TOKENS,
                        "min": 0,
                        "max": 1 << 24,
                        "step": 64,
                        "tooltip": _TOOLTIPS["min_tokens"],
                    },
                ),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = "Step-aware sparse self-attention from dit_accel for DiT video models (Wan and friends)."
    EXPERIMENTAL = True

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent: float, end_percent: float, dense_blocks: str) -> bool | str:  # noqa: N802
        """Checked when the prompt is queued (ComfyUI's name and convention: True, or an error message)."""
        return validate_node_inputs(start_percent, end_percent, dense_blocks)

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
                    io.Combo.Input(
                        "method", options=_method_choices(), default=DEFAULT_METHOD, tooltip=_TOOLTIPS["method"]
                    ),
                    io.Float.Input(
                        "sparsity", default=0.9, min=-1.0, max=0.99, step=0.01, tooltip=_TOOLTIPS["sparsity"]
                    ),
                    io.Float.Input(
                        "start_percent", default=0.2, min=0.0, max=1.0, step=0.01, tooltip=_TOOLTIPS["start_percent"]
                    ),
                    io.Float.Input(
                        "end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=_TOOLTIPS["end_percent"]
                    ),
                    io.String.Input("dense_blocks", default="0", tooltip=_TOOLTIPS["dense_blocks"]),
                    io.Int.Input(
                        "min_tokens",
                        default=DEFAULT_MIN_TOKENS,
                        min=0,
                        max=1 << 24,
                        step=64,
                        tooltip=_TOOLTIPS["min_tokens"],
                    ),
                ],
                outputs=[io.Model.Output()],
            )

        @classmethod
        def validate_inputs(cls, start_percent: float, end_percent: float, dense_blocks: str) -> bool | str:
            """V3's VALIDATE_INPUTS: the same check as the V1 node."""
            return validate_node_inputs(start_percent, end_percent, dense_blocks)

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

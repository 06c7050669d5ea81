"""The installed machinery: a state hook on each transformer and an interceptor at each self-attention site.

The transformer hook fills the denoising state before every forward. Each site hook runs the attention
module's own forward (projections, RoPE, QK-norm, LoRA stay stock) under a ``TorchFunctionMode`` that catches
its ``scaled_dot_product_attention`` call, so the same code serves processors that call SDPA directly
(CogVideoX, PixArt) and those going through diffusers' dispatcher with the native backend (Wan, LTX, Flux,
HunyuanVideo). Everything is per instance and removed by :meth:`Accelerator.remove`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch.overrides import TorchFunctionMode

from .config import AccelConfig
from .kernels.masks import key_padding_from_mask
from .methods import Method, SiteCall, SparseResult, build_method
from .parallel import enter_forward
from .pipelines.families import Family
from .state import StepTracker

__all__ = ["Accelerator", "CacheLedger", "SiteEvent", "SiteStats"]

STATE_HOOK = "dit_accel.state"
SITE_HOOK = "dit_accel.site"


@dataclass
class SiteStats:
    """Counters of one attention site. Densities are kept as sums (tensors) and read out in ``as_dict``."""

    dense_calls: int = 0
    sparse_calls: int = 0
    refresh_calls: int = 0
    dense_reasons: Counter = field(default_factory=Counter)
    density_sum: Any = 0.0
    video_density_sum: Any = 0.0
    video_density_calls: int = 0
    pattern_builds: int = 0
    pattern_reuses: int = 0
    adaptive_refreshes: int = 0
    cache_bytes_peak: int = 0

    def add(self, other: SiteStats) -> None:
        self.dense_calls += other.dense_calls
        self.sparse_calls += other.sparse_calls
        self.refresh_calls += other.refresh_calls
        self.dense_reasons.update(other.dense_reasons)
        self.density_sum = self.density_sum + other.density_sum
        self.video_density_sum = self.video_density_sum + other.video_density_sum
        self.video_density_calls += other.video_density_calls
        self.pattern_builds += other.pattern_builds
        self.pattern_reuses += other.pattern_reuses
        self.adaptive_refreshes += other.adaptive_refreshes
        # cache_bytes_peak is not summed: per-site peaks need not coincide; totals read the CacheLedger's peak

    def as_dict(self, cache_bytes: int) -> dict[str, Any]:
        measured = self.sparse_calls + self.refresh_calls
        density = float(self.density_sum) / measured if measured else None
        video = float(self.video_density_sum) / self.video_density_calls if self.video_density_calls else None
        return {
            "dense_calls": self.dense_calls,
            "sparse_calls": self.sparse_calls,
            "refresh_calls": self.refresh_calls,
            "dense_reasons": dict(self.dense_reasons),
            "block_density": density,
            "video_block_density": video,
            "cache_bytes": cache_bytes,
            "pattern_builds": self.pattern_builds,
            "pattern_reuses": self.pattern_reuses,
            "adaptive_refreshes": self.adaptive_refreshes,
            "cache_bytes_peak": self.cache_bytes_peak,
        }


@dataclass
class CacheLedger:
    """Bytes all sites of one ``accelerate()`` hold in their caches now, and the most they held at once.

    Shared by the accelerators of every transformer of a pipeline, so the peak is the true simultaneous one
    (summing per-site peaks overstates it: sites do not peak together once caches are cleared per generation).
    """

    held: int = 0
    peak: int = 0

    def update(self, old: int, new: int) -> None:
        self.held += new - old
        self.peak = max(self.peak, self.held)


@dataclass
class SiteEvent:
    """One attention call as seen by an observer (see ``Accelerator.observers``): the inputs in the kernel layout,
    the output that went back to the model, what the site decided, and start/end timers.

    Observers exist for the evaluator's attention probe and attention timing; with none registered the site
    does no extra work.
    """

    site_index: int
    site_name: str
    step: int
    num_steps: int | None
    branch: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float | None
    out: torch.Tensor
    kind: str  # "dense", "sparse" or "refresh"
    reason: str | None  # why it stayed dense
    density: Any  # achieved block density of a sparse/refresh call (tensor or float), None when dense
    timers: tuple[Any, Any]  # (start, end): perf_counter floats on CPU, CUDA events on GPU

    def seconds(self) -> float:
        """Duration of the call; synchronises the CUDA events' stream when needed."""
        start, end = self.timers
        if isinstance(start, float):
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000.0


def _timer(device: torch.device) -> Any:
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    import time

    return time.perf_counter()


class _ContextState(BaseState):
    """Placeholder state: the manager only exists so diffusers' ``cache_context`` reaches this hook."""

    def reset(self, *args: Any, **kwargs: Any) -> None:
        return None


class _StateHook(ModelHook):
    """Sets the denoising state before each transformer forward; reset at the end of each pipeline call."""

    _is_stateful = True

    def __init__(self, accelerator: Accelerator) -> None:
        super().__init__()
        self.accelerator = accelerator
        self.context = StateManager(_ContextState)

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.accelerator.begin_forward(module, args, kwargs, self.context._context)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.accelerator.tracker.end()
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.accelerator.new_generation()
        return module


class _SDPAInterceptor(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` calls made inside one attention module to its site."""

    def __init__(self, site: _Site) -> None:
        super().__init__()
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.site.attention(func, args, kwargs)
        return func(*args, **kwargs)


class _SiteHook(ModelHook):
    def __init__(self, site: _Site) -> None:
        super().__init__()
        self.site = site

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        with _SDPAInterceptor(self.site):
            return self.fn_ref.original_forward(*args, **kwargs)


class _Site:
    """One self-attention module: decides dense or sparse per call and keeps per-branch caches."""

    def __init__(self, accelerator: Accelerator, index: int, name: str, module: torch.nn.Module) -> None:
        self.accelerator = accelerator
        self.index = index
        self.name = name
        self.module = module
        self.stats = SiteStats()
        self.caches: dict[str, dict[str, Any]] = {}
        self.held_bytes = 0  # what this site last reported to the ledger

    def clear(self) -> None:
        """Drop the per-branch caches (a new generation, or removal) and tell the ledger."""
        self.caches.clear()
        self.accelerator.ledger.update(self.held_bytes, 0)
        self.held_bytes = 0

    def account(self) -> None:
        """Report the bytes this site's caches hold now to the ledger and to the site's own peak."""
        held = self.cache_bytes()
        self.accelerator.ledger.update(self.held_bytes, held)
        self.held_bytes = held
        self.stats.cache_bytes_peak = max(self.stats.cache_bytes_peak, held)

    def cache_bytes(self) -> int:
        total = 0
        for cache in self.caches.values():
            for value in cache.values():
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    def _dense(self, func, args, kwargs, reason: str):
        self.stats.dense_calls += 1
        self.stats.dense_reasons[reason] += 1
        if self.accelerator.config.dense_backend == "xformers":
            out = xformers_dense(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)

    @torch.compiler.disable
    def attention(self, func, args: tuple, kwargs: dict[str, Any]):
        if not self.accelerator.observers:
            return self._attention(func, args, kwargs)
        return self._observed(func, args, kwargs)

    def _observed(self, func, args: tuple, kwargs: dict[str, Any]):
        """Run the call and tell every observer what happened (counters are diffed, so decisions are untouched)."""
        q = kwargs.get("query", args[0] if args else None)
        k = kwargs.get("key", args[1] if len(args) > 1 else None)
        v = kwargs.get("value", args[2] if len(args) > 2 else None)
        scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
        before = (self.stats.dense_calls, self.stats.sparse_calls, Counter(self.stats.dense_reasons))
        density_before = self.stats.density_sum
        start = _timer(q.device)
        out = self._attention(func, args, kwargs)
        end = _timer(q.device)
        if self.stats.dense_calls > before[0]:
            kind, density = "dense", None
            reason = next(iter((self.stats.dense_reasons - before[2]).keys()), None)
        else:
            kind = "sparse" if self.stats.sparse_calls > before[1] else "refresh"
            reason, density = None, self.stats.density_sum - density_before  # no host sync here
        state = self.accelerator.tracker.state
        event = SiteEvent(
            site_index=self.index,
            site_name=self.name,
            step=state.step,
            num_steps=state.num_steps,
            branch=state.branch,
            q=q,
            k=k,
            v=v,
            scale=scale,
            out=out,
            kind=kind,
            reason=reason,
            density=density,
            timers=(start, end),
        )
        for observer in list(self.accelerator.observers):
            observer(event)
        return out

    def _attention(self, func, args: tuple, kwargs: dict[str, Any]):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        q, k, v = bound["query"], bound["key"], bound["value"]
        acc = self.accelerator
        state = acc.tracker.state
        config = acc.config
        key_padding = _key_padding(q, k, bound.get("attn_mask"))  # key-padding wiring: no host sync
        reason = self._input_reason(q, k, v, bound, key_padding)
        if reason is None and not state.active:
            reason = "outside_forward"
        if reason is None and q.shape[-2] < config.min_tokens:
            reason = "min_tokens"
        if reason is None and self.index in config.dense_layers:
            reason = "dense_layer"
        if reason is None and state.step < config.dense_step_count(state.num_steps):
            reason = "dense_step"
        layout = state.layout
        if layout is not None and layout.total_tokens != q.shape[-2]:
            layout = None
        if reason is None and layout is None and acc.family.text_first is not None:
            reason = "no_layout"  # text tokens somewhere in the sequence: a pattern would not keep them dense
        call = None
        if reason is None:
            call = SiteCall(
                q=q,
                k=k,
                v=v,
                scale=bound.get("scale"),
                config=config,
                state=state,
                layout=layout,
                site_index=self.index,
                site_name=self.name,
                cache=self.caches.setdefault(state.branch, {}),
                key_padding=key_padding,
            )
            reason = acc.method.dense_reason(call)
        if reason is not None:
            return self._dense(func, args, kwargs, reason)
        result: SparseResult = acc.method.attend(call)
        self._record(result)
        return result.out.to(q.dtype)

    def _record(self, result: SparseResult) -> None:
        if result.kind == "refresh":
            self.stats.refresh_calls += 1
        else:
            self.stats.sparse_calls += 1
        if result.pattern_built is True:
            self.stats.pattern_builds += 1
        elif result.pattern_built is False:
            self.stats.pattern_reuses += 1
        if result.adaptive:
            self.stats.adaptive_refreshes += 1
        self.account()
        density = result.density.detach() if isinstance(result.density, torch.Tensor) else result.density
        self.stats.density_sum = self.stats.density_sum + density
        if result.video_density is not None:
            vd = result.video_density
            self.stats.video_density_sum = self.stats.video_density_sum + (
                vd.detach() if isinstance(vd, torch.Tensor) else vd
            )
            self.stats.video_density_calls += 1

    @staticmethod
    def _input_reason(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bound: dict[str, Any], key_padding: torch.Tensor | None
    ) -> str | None:
        if q.dim() != 4 or k.dim() != 4:
            return "layout"
        if q.shape[-2] != k.shape[-2]:
            return "cross_attention"
        if q.shape[1] != k.shape[1] or bound.get("enable_gqa"):
            return "gqa"
        if bound.get("is_causal"):
            return "causal"
        if bound.get("dropout_p", 0.0):
            return "dropout"
        if bound.get("attn_mask") is not None and key_padding is None:
            return "attn_mask"  # not provably a boolean key-padding mask (see kernels.masks)
        return None


def _key_padding(q: torch.Tensor, k: torch.Tensor, mask: Any) -> torch.Tensor | None:
    """bool (B, N) key padding of SDPA's ``attn_mask`` (True = attend), or None: no mask, or not key padding."""
    if not isinstance(mask, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
        return None
    return key_padding_from_mask(mask, batch=q.shape[0], heads=q.shape[1], n_q=q.shape[-2], n_k=k.shape[-2])


def xformers_dense(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """Dense attention by xformers' memory-efficient kernel, or None when the call needs SDPA's features."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if bound.get("attn_mask") is not None or bound.get("dropout_p") or bound.get("is_causal"):
        return None
    q, k, v = bound["query"], bound["key"], bound["value"]
    if q.dim() != 4 or k.shape[1] != q.shape[1]:
        return None
    import xformers.ops as xops

    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=bound.get("scale")
    )
    return out.transpose(1, 2)


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Take hook ``name`` off ``module``, and the registry too when nothing else is left in it."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if registry.hooks:
        return
    del module._diffusers_hook
    forward = module.__dict__.get("forward")  # the registry left the class's forward bound on the instance
    if getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module:
        del module.forward


class Accelerator:
    """Everything installed on one transformer, and how to take it off again."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        family: Family,
        config: AccelConfig,
        scheduler: Any = None,
        ledger: CacheLedger | None = None,
    ):
        self.transformer = transformer
        #: cache bytes held now and their simultaneous peak, shared with the pipeline's other transformers
        self.ledger = ledger if ledger is not None else CacheLedger()
        self.family = family
        self.config = config
        self.method: Method = build_method(config)
        self.tracker = StepTracker(scheduler=scheduler, num_steps_hint=config.num_steps)
        self.sites: list[_Site] = []
        self._installed = False
        #: Callables receiving a :class:`SiteEvent` per attention call; empty (and free) unless an evaluator
        #: registers one.
        self.observers: list[Callable[[SiteEvent], None]] = []

    def install(self) -> None:
        sites = self.family.sites(self.transformer)
        if not sites:
            raise ValueError(
                f"{type(self.transformer).__name__} has no self-attention modules matching the {self.family.name} "
                "family's pattern; is this a modified model?"
            )
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.register_hook(_StateHook(self), STATE_HOOK)
        for index, (name, module) in enumerate(sites):
            site = _Site(self, index, name, module)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_SiteHook(site), SITE_HOOK)
            self.sites.append(site)
        self._installed = True

    def remove(self) -> None:
        if not self._installed:
            return
        for site in self.sites:
            remove_hook(site.module, SITE_HOOK)
            site.clear()
        remove_hook(self.transformer, STATE_HOOK)
        self._installed = False

    @property
    def installed(self) -> bool:
        return self._installed

    @torch.compiler.disable
    def begin_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], context: Any) -> None:
        enter_forward(module)  # refuses unsupported context parallelism; sets the Ulysses head group
        bound = self.family.bind(module, args, kwargs)
        layout = self.family.layout(module, bound)
        timestep = bound.get("timestep")
        if isinstance(timestep, torch.Tensor) and self.family.timestep_scale != 1.0:
            timestep = timestep * self.family.timestep_scale
        elif timestep is not None and not isinstance(timestep, torch.Tensor):
            timestep = float(timestep) * self.family.timestep_scale
        generation = self.tracker.state.generation
        self.tracker.begin(timestep, context, layout)
        if self.tracker.state.generation != generation:
            self._clear_caches()

    def new_generation(self) -> None:
        self.tracker.new_generation()
        self._clear_caches()

    def _clear_caches(self) -> None:
        for site in self.sites:
            site.clear()

    def stats(self) -> dict[str, Any]:
        overall = SiteStats()
        sites = {}
        total_cache = 0
        for site in self.sites:
            overall.add(site.stats)
            cache = site.cache_bytes()
            total_cache += cache
            sites[site.name] = site.stats.as_dict(cache)
        totals = overall.as_dict(total_cache)
        totals["cache_bytes_peak"] = self.ledger.peak  # simultaneous, not the sum of per-site peaks
        return {
            "family": self.family.name,
            "transformer": type(self.transformer).__name__,
            "overall": totals,
            "sites": sites,
        }

"""The site core: what every integration (diffusers hooks, FreeSwim, the ComfyUI node) shares.

An integration supplies three things: where the step and the CFG branch come from (a
:class:`~dit_accel.state.DenoiseState` per call), how the attention call is intercepted, and the dense call to fall
back on. Everything else lives here, once: the dense decision and its reason names (:data:`DENSE_REASONS`), the
schedule (:mod:`dit_accel.schedule`), the typed per-site, per-branch state
(:class:`~dit_accel.methods.base.BranchState`, reset per generation), the cache ledger and the stats.

:class:`SiteGroup` holds the sites of one model under one config; :class:`SiteCore` is one attention site.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import AccelConfig
from .kernels.backends import KernelPolicy, use_backend
from .kernels.masks import key_padding_from_mask
from .methods import CacheBudgetError, Method, SiteCall, SparseResult, build_method
from .schedule import dense_reason, resolve_drift
from .site_state import BranchState
from .state import DenoiseState

__all__ = ["DENSE_REASONS", "CacheLedger", "SiteCore", "SiteEvent", "SiteGroup", "SiteStats"]

#: Why a call stayed dense; the same names in every integration's stats.
DENSE_REASONS: dict[str, str] = {
    "layout": "inputs are not (batch, heads, tokens, dim) tensors",
    "cross_attention": "queries and keys differ in length (cross-attention)",
    "gqa": "grouped-query attention (fewer key heads than query heads)",
    "causal": "a causal mask",
    "dropout": "attention dropout",
    "attn_mask": "a mask that is not boolean key padding",
    "outside_forward": "called outside a tracked transformer forward",
    "outside_window": "outside the integration's step window (ComfyUI start/end percent)",
    "min_tokens": "the sequence is shorter than min_tokens",
    "dense_layer": "the layer is in dense_layers",
    "dense_step": "one of the first dense_steps steps",
    "no_layout": "the token layout is unknown and the pattern or text tokens need it",
    "vmoba_local": "token-gated VMoBA would choose only each query's own chunk (one chunk, or top-1): the official "
    "code runs dense then",
    "method": "the method is dense (the A/B reference)",
}


@dataclass
class SiteStats:
    """Counters of one attention site. Densities are kept as sums (tensors, no sync) and read in ``as_dict``."""

    dense_calls: int = 0
    sparse_calls: int = 0
    refresh_calls: int = 0
    dense_reasons: Counter = field(default_factory=Counter)
    density_sum: Any = 0.0
    video_density_sum: Any = 0.0
    video_density_calls: int = 0
    work_sum: Any = 0.0  # dense calls count 1, the others their density plus their extra work
    pattern_builds: int = 0
    pattern_reuses: int = 0
    adaptive_refreshes: int = 0
    cache_bytes_peak: int = 0
    #: tracked transformer forwards in which this site's attention never ran: a step cache (diffusers'
    #: FirstBlockCache, PyramidAttentionBroadcast, ...) skipped its block or reused its output
    skipped_calls: int = 0

    def add(self, other: SiteStats) -> None:
        self.dense_calls += other.dense_calls
        self.sparse_calls += other.sparse_calls
        self.refresh_calls += other.refresh_calls
        self.dense_reasons.update(other.dense_reasons)
        self.density_sum = self.density_sum + other.density_sum
        self.video_density_sum = self.video_density_sum + other.video_density_sum
        self.video_density_calls += other.video_density_calls
        self.work_sum = self.work_sum + other.work_sum
        self.pattern_builds += other.pattern_builds
        self.pattern_reuses += other.pattern_reuses
        self.adaptive_refreshes += other.adaptive_refreshes
        self.skipped_calls += other.skipped_calls
        # cache_bytes_peak is not summed: per-site peaks need not coincide; totals read the CacheLedger's peak

    def as_dict(self, cache_bytes: int) -> dict[str, Any]:
        measured = self.sparse_calls + self.refresh_calls
        density = float(self.density_sum) / measured if measured else None
        video = float(self.video_density_sum) / self.video_density_calls if self.video_density_calls else None
        calls = self.dense_calls + measured
        work = (self.dense_calls + float(self.work_sum)) / calls if calls else None
        return {
            "dense_calls": self.dense_calls,
            "sparse_calls": self.sparse_calls,
            "refresh_calls": self.refresh_calls,
            "dense_reasons": dict(self.dense_reasons),
            "block_density": density,
            "video_block_density": video,
            "attention_work": work,
            "cache_bytes": cache_bytes,
            "pattern_builds": self.pattern_builds,
            "pattern_reuses": self.pattern_reuses,
            "adaptive_refreshes": self.adaptive_refreshes,
            "cache_bytes_peak": self.cache_bytes_peak,
            "skipped_calls": self.skipped_calls,
        }


@dataclass
class CacheLedger:
    """Bytes all sites of one ``accelerate()`` hold in their caches now, and the most they held at once.

    Shared by the sites of every transformer of a pipeline, so the peak is the true simultaneous one (summing
    per-site peaks overstates it: sites do not peak together once caches are cleared per generation), and
    ``cache_budget_mb`` is checked against it.
    """

    held: int = 0
    peak: int = 0

    def update(self, old: int, new: int) -> None:
        self.held += new - old
        self.peak = max(self.peak, self.held)


@dataclass
class SiteEvent:
    """One attention call as seen by an observer (see :attr:`SiteGroup.observers`): the inputs in the kernel
    layout, the output that went back to the model, what the site decided, and start/end timers.

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
    attn_mask: torch.Tensor | None = None  # the call's own mask, as the model passed it (keys it may not see)
    is_causal: bool = False

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
    return time.perf_counter()


def input_reason(
    q: Any,
    k: Any,
    v: Any,
    *,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    enable_gqa: bool = False,
    key_padding: torch.Tensor | None = None,
) -> str | None:
    """Why these attention inputs cannot take the sparse path (shape and arguments only: no host sync).

    ``key_padding`` is what :func:`key_padding_of` read from ``attn_mask``; a mask it could not read stays dense.
    """
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "layout"
    if q.shape[-2] != k.shape[-2]:
        return "cross_attention"
    if q.shape[1] != k.shape[1] or enable_gqa:
        return "gqa"
    if is_causal:
        return "causal"
    if dropout_p:
        return "dropout"
    if attn_mask is not None and key_padding is None:
        return "attn_mask"  # not provably a boolean key-padding mask (see dit_accel.kernels.masks)
    return None


def key_padding_of(q: Any, k: Any, mask: Any) -> torch.Tensor | None:
    """bool (B, N) key padding of an SDPA ``attn_mask`` (True = attend), or None: no mask, or not key padding
    (read from shape and strides only: no host sync)."""
    if not isinstance(mask, torch.Tensor) or not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        return None
    if q.dim() != 4 or k.dim() != 4:
        return None
    return key_padding_from_mask(mask, batch=q.shape[0], heads=q.shape[1], n_q=q.shape[-2], n_k=k.shape[-2])


class SiteCore:
    """One self-attention site: decides dense or sparse per call, keeps its per-branch state and its stats."""

    def __init__(self, group: SiteGroup, index: int, name: str, module: torch.nn.Module | None = None) -> None:
        self.group = group
        self.index = index
        self.name = name
        self.module = module  # the attention module it serves, when the integration has one
        self.stats = SiteStats()
        self.branches: dict[str, BranchState] = {}
        self.held_bytes = 0  # what this site last reported to the ledger
        self.calls_this_forward = 0  # calls since the group's last end_forward (per-sample calls, see branch_key)

    # -- state -------------------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Drop the per-branch state (a new generation, or removal) and tell the ledger."""
        self.branches.clear()
        self.group.ledger.update(self.held_bytes, 0)
        self.held_bytes = 0

    def cache_bytes(self) -> int:
        return sum(branch.nbytes() for branch in self.branches.values())

    def branch_key(self, state: DenoiseState) -> str:
        """The per-branch state this call uses. A model that calls SDPA once per sample within one forward
        (Mochi, whose layout reads its text per call) keeps one state per call order: else the samples, of
        different lengths, would share one pattern and refresh at every call for the shape change."""
        n = self.calls_this_forward
        self.calls_this_forward += 1
        if n == 0 or state.layout is None or not state.layout.text_per_call:
            return state.branch
        return f"{state.branch}#{n}"

    def account(self, call: SiteCall | None = None) -> None:
        """Report the bytes held now to the ledger and the site's peak; refuse past ``cache_budget_mb``."""
        held = self.cache_bytes()
        ledger = self.group.ledger
        budget = self.group.config.cache_budget_mb
        if budget is not None and held > self.held_bytes and ledger.held - self.held_bytes + held > budget * 2**20:
            others = ledger.held - self.held_bytes
            where = f" (branch {call.state.branch!r})" if call is not None else ""
            self.clear()
            raise CacheBudgetError(
                f"cache_budget_mb={budget!r} is too small: site {self.name!r}{where} needs {held / 2**20:.2f} MiB "
                f"of cached patterns and statistics on top of {others / 2**20:.2f} MiB held by other sites and "
                "branches; raise cache_budget_mb, set cache_dtype='bfloat16', keep more layers dense "
                "(dense_layers) or use a method without a residual cache"
            )
        ledger.update(self.held_bytes, held)
        self.held_bytes = held
        self.stats.cache_bytes_peak = max(self.stats.cache_bytes_peak, held)

    # -- the call ----------------------------------------------------------------------------------------------
    def attend(
        self,
        q: Any,
        k: Any,
        v: Any,
        *,
        state: DenoiseState,
        dense: Callable[[], torch.Tensor],
        scale: float | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        dropout_p: float = 0.0,
        enable_gqa: bool = False,
        reason: str | None = None,
        to_caller: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The output of this call: sparse through the method, or ``dense()`` (counted with its reason).

        ``q, k, v`` are in the kernel layout (B, H, N, D); ``reason`` is a dense reason the integration decided
        (e.g. ``outside_window``). A sparse output has q's dtype and the kernel layout, or whatever ``to_caller``
        makes of it (the integration's layout, which ``dense()`` returns already).
        """
        args = (q, k, v, state, dense, scale, attn_mask, is_causal, dropout_p, enable_gqa, reason)
        if not self.group.observers:
            out, kind = self._attend(*args)[:2]
            return to_caller(out) if to_caller is not None and kind != "dense" else out
        start = _timer(q.device)
        out, kind, why, density = self._attend(*args)
        end = _timer(q.device)
        event = SiteEvent(
            site_index=self.index, site_name=self.name, step=state.step, num_steps=state.num_steps,
            branch=state.branch, q=q, k=k, v=v, scale=scale, out=out, kind=kind, reason=why, density=density,
            timers=(start, end), attn_mask=attn_mask, is_causal=is_causal,
        )  # fmt: skip
        for observer in list(self.group.observers):
            observer(event)
        return to_caller(out) if to_caller is not None and kind != "dense" else out

    def _attend(self, q, k, v, state, dense, scale, attn_mask, is_causal, dropout_p, enable_gqa, reason):
        group = self.group
        key_padding = key_padding_of(q, k, attn_mask)
        if reason is None:
            reason = input_reason(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p, enable_gqa=enable_gqa,
                key_padding=key_padding,
            )  # fmt: skip
        if reason is None:
            reason = dense_reason(group.config, self.index, q.shape[-2], state)
        layout = state.layout.for_tokens(q.shape[-2]) if state.layout is not None else None
        branch = self.branch_key(state)  # every call counts, dense or not, so the order is the model's
        if reason is None and layout is None and group.text_tokens:
            reason = "no_layout"  # text tokens somewhere in the sequence: a pattern would not keep them dense
        call = None
        if reason is None:
            call = SiteCall(
                q=q, k=k, v=v, scale=scale, config=group.config, state=state, layout=layout, site_index=self.index,
                site_name=self.name, cache=self.branches.setdefault(branch, BranchState()),
                key_padding=key_padding,
            )  # fmt: skip
            reason = group.method.dense_reason(call)
        if reason is not None:
            self.stats.dense_calls += 1
            self.stats.dense_reasons[reason] += 1
            return dense(), "dense", reason, None
        with use_backend(group.kernel_policy):  # the config's kernel_backend for the method's kernel calls
            result = group.method.attend(call)
        self._record(result, call)
        return result.out.to(q.dtype), result.kind, None, result.density

    def _record(self, result: SparseResult, call: SiteCall) -> None:
        stats = self.stats
        if result.kind == "refresh":
            stats.refresh_calls += 1
        else:
            stats.sparse_calls += 1
        if result.pattern_built is True:
            stats.pattern_builds += 1
        elif result.pattern_built is False:
            stats.pattern_reuses += 1
        if result.adaptive:
            stats.adaptive_refreshes += 1
        self.account(call)
        density = result.density.detach() if isinstance(result.density, torch.Tensor) else result.density
        stats.density_sum = stats.density_sum + density
        stats.work_sum = stats.work_sum + density + result.extra_work
        if result.video_density is not None:
            vd = result.video_density
            stats.video_density_sum = stats.video_density_sum + (vd.detach() if isinstance(vd, torch.Tensor) else vd)
            stats.video_density_calls += 1


class SiteGroup:
    """The attention sites of one model under one config: the object every integration holds.

    Args:
        config: the validated configuration.
        ledger: shared with the other transformers of a pipeline (one ``accelerate()``); a new one by default.
        text_tokens: whether self-attention may hold text tokens (joint attention): without a readable token
            layout such calls stay dense (reason ``no_layout``) instead of sparsifying the text.
        method: the method object (default: built from ``config``).
    """

    def __init__(
        self,
        config: AccelConfig,
        *,
        ledger: CacheLedger | None = None,
        text_tokens: bool = False,
        method: Method | None = None,
    ) -> None:
        self.config = config
        self.method: Method = method if method is not None else build_method(config)
        self.ledger = ledger if ledger is not None else CacheLedger()
        self.text_tokens = text_tokens
        #: the config's ``kernel_backend``, and what ``auto`` chose for this group's calls (``handle.stats()``)
        self.kernel_policy = KernelPolicy(config.kernel_backend)
        self.sites: list[SiteCore] = []
        self._by_index: dict[int, SiteCore] = {}
        #: Callables receiving a :class:`SiteEvent` per attention call; empty (and free) unless an evaluator
        #: registers one.
        self.observers: list[Callable[[SiteEvent], None]] = []

    def site(self, index: int, name: str | None = None, module: torch.nn.Module | None = None) -> SiteCore:
        """The site with layer index ``index`` (created on first use)."""
        site = self._by_index.get(index)
        if site is None:
            site = SiteCore(self, index, name if name is not None else f"blocks.{index}", module)
            self._by_index[index] = site
            self.sites.append(site)
        return site

    def use_method(self, method: Method) -> None:
        """Switch to another method object (FreeSwim: a new window geometry); the sites' state is dropped."""
        self.method = method
        self.config = method.config
        self.kernel_policy = KernelPolicy(self.config.kernel_backend)
        self.new_generation()

    def new_generation(self) -> None:
        """Drop every site's per-branch state: a new generation starts."""
        for site in self.sites:
            site.clear()
            site.calls_this_forward = 0

    def end_forward(self) -> None:
        """Once per transformer forward: read the sites' pending drift measurements (one host sync at most)."""
        for site in self.sites:
            site.calls_this_forward = 0
        if self.config.refresh_drift > 0:
            resolve_drift(self.config, (b for site in self.sites for b in site.branches.values()))

    def stats(self) -> dict[str, Any]:
        """``{"overall": ..., "sites": {name: ...}}`` with the ledger's simultaneous cache peak."""
        overall = SiteStats()
        sites: dict[str, Any] = {}
        total_cache = 0
        for site in self.sites:
            overall.add(site.stats)
            cache = site.cache_bytes()
            total_cache += cache
            sites[site.name] = site.stats.as_dict(cache)
        totals = overall.as_dict(total_cache)
        totals["cache_bytes_peak"] = self.ledger.peak
        return {"overall": totals, "sites": sites}

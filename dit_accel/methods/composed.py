"""The composed method: pattern x compensation x schedule on the kernels of :mod:`dit_accel.kernels`.

Every seed-method preset (and any mix of parts) runs through :class:`ComposedMethod`. Per call it: takes the
site's plan (token order, groups) from the geometry; reorders q, k, v when the pattern works on 3D tiles or
VMoBA chunks; asks the schedule whether to refresh and whether the cached pattern is still valid; runs the
kernel; applies the compensation; and restores the native token order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..compensation import SLAProjections, combine_linear, reshape_statistics
from ..config import AccelConfig
from ..layout import TokenLayout
from ..patterns import GEOMETRIC_PATTERNS, Plan, build_pattern, plan_for
from ..patterns.vmoba import vmoba_keep
from ..schedule import lse_drift, needs_statistics, plan_call
from ..site_state import BlockPattern, Statistics
from .base import Method, SiteCall, SparseResult

__all__ = ["CacheBudgetError", "ComposedMethod"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def value_mean(v: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
    """Mean value vector per (batch, head) over the keys that take part: float32 (B, H, D), accumulated in float32
    without a float32 copy of ``v``."""
    if key_padding is None:
        return v.mean(dim=2, dtype=torch.float32)
    kept = key_padding[:, None, :, None]
    total = torch.where(kept, v, 0).sum(dim=2, dtype=torch.float32)
    return total / kept.sum(dim=2).clamp_min(1).float()


def shifted_residual(residual: torch.Tensor, rho: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Re-ttention's residual moved with the values: ``R + (1 - rho) * delta`` per row.

    R holds the skipped keys' share of the refresh step's output, weighted by their mass 1 - rho. As denoising
    moves the values, R goes stale: on the toy model a cached R made every sparse step brighter than dense (mean
    0.34 against 0.25) and worse than no compensation by the fourth sparse step. Moving it by the change of the
    mean value keeps the first moment of the skipped part current at the cost of one mean per call. One tensor of
    R's shape and dtype is written (the broadcast product is never materialised).
    """
    missing = (1.0 - rho)[..., None].to(residual.dtype)
    return torch.addcmul(residual, missing, delta[:, :, None, :].to(residual.dtype))


class CacheBudgetError(RuntimeError):
    """The caches of all sites and branches would exceed ``cache_budget_mb``."""


class ComposedMethod(Method):
    """A pattern, a compensation and a schedule, configured by :class:`AccelConfig`."""

    name = "composed"

    def __init__(self, config: AccelConfig) -> None:
        super().__init__(config)
        self.projections = SLAProjections()
        self._plans: dict[tuple, Plan] = {}

    # -- schedule hooks -------------------------------------------------------------------------------------
    def dense_reason(self, call: SiteCall) -> str | None:
        cfg = self.config
        if cfg.pattern.kind in GEOMETRIC_PATTERNS and (
            call.layout is None or call.layout.total_tokens != call.q.shape[2]
        ):
            return "no_layout"
        if cfg.pattern.kind == "vmoba" and cfg.vmoba_gate == "token":
            # the official code runs dense when no query chooses a chunk besides its own: always so with one
            # chunk or a top-1 (the rarer data-dependent case selects every chunk on the device instead)
            plan = self.plan(call)
            groups = plan.groups
            if groups is not None and (
                groups.n_groups == 1
                or cfg.vmoba_select == "topk"
                and vmoba_keep(cfg.vmoba_topk, cfg.sparsity, plan.partition, groups.n_groups) == 1
            ):
                return "vmoba_local"
        return None

    # -- helpers --------------------------------------------------------------------------------------------
    def plan(self, call: SiteCall) -> Plan:
        """The site's token order and groups for this sequence shape (cached: geometry only)."""
        return self._plan(call.layout, call.q.shape[2], call.site_index, call.q.device)

    def _plan(self, layout: TokenLayout | None, n: int, site_index: int, device: torch.device) -> Plan:
        partition_key = site_index % 3 if self.config.pattern.kind == "vmoba" else 0
        key = (partition_key, n, layout, device.type, device.index)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 64:
                self._plans.clear()
            plan = plan_for(self.config, layout, n, site_index, device)
            self._plans[key] = plan
        return plan

    def forward_order(
        self, layout: TokenLayout, n: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The plan's tile order, shared by every site (VMoBA's changes per layer: None); the same tensors as the
        sites' plans (one cache), so :meth:`attend` recognises inputs already in it."""
        if self.config.pattern.kind == "vmoba" or layout.total_tokens != n or layout.text_tokens:
            return None
        plan = self._plan(layout, n, 0, device)
        return (plan.perm, plan.inv) if plan.perm is not None and plan.inv is not None else None

    def _lut(self, pattern: BlockPattern, b: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, counts = pattern.kv_indices, pattern.kv_counts
        if idx.shape[0] != b or idx.shape[1] != h:  # a static pattern: expand once, then reuse
            idx = idx.expand(b, h, -1, -1).contiguous()
            counts = counts.expand(b, h, -1).contiguous()
            pattern.kv_indices, pattern.kv_counts = idx, counts
        return idx, counts

    def _build_pattern(
        self, call: SiteCall, plan: Plan, q: torch.Tensor, k: torch.Tensor, kp: torch.Tensor | None
    ) -> BlockPattern:
        cfg = self.config
        pattern = build_pattern(cfg, plan, q, k, call.layout, call.scale, key_padding=kp)
        kv_indices, kv_counts = kernels.lut_from_mask(pattern.mask)
        if pattern.max_count is not None:  # as wide as its longest row can be: the kernels tune by that width
            kv_indices = kv_indices[..., : max(1, pattern.max_count)]
        mask = pattern.mask
        video_density = None
        if plan.has_video_rows:  # mean over the query blocks holding no text, without boolean indexing (a sync)
            video = (~plan.dense_rows).float()
            video_density = (mask.float().mean(dim=(0, 1, 3)) * video).sum() / video.sum()
        built = BlockPattern(
            kv_indices=kv_indices,
            kv_counts=kv_counts,
            density=mask.float().mean(),
            video_density=video_density,
            step=call.state.step,
            shape=(plan.n, *q.shape[:2]),
            static=pattern.static,
            negligible=pattern.negligible,
            outside=~mask if cfg.compensation.kind == "linear" and cfg.linear_weight == "mass" else None,
            key_groups=pattern.key_groups,
            query_groups=pattern.query_groups,
        )
        call.cache.pattern = built
        return built

    def _cache_tensor(self, x: torch.Tensor, old: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` in the cache's dtype; with ``cache_offload`` from a GPU, copied asynchronously into pinned host
        memory (the previous refresh's buffer when it fits), so neither the copy out nor the one back waits."""
        dtype = _DTYPES.get(self.config.cache_dtype)
        if dtype is not None:
            x = x.to(dtype)
        if not self.config.cache_offload or x.device.type == "cpu":
            return x
        reusable = (
            old is not None and old.device.type == "cpu" and old.shape == x.shape and old.dtype == x.dtype
        ) and old.is_pinned()
        buffer = old if reusable else torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
        buffer.copy_(x, non_blocking=True)  # stream-ordered: reads of the old contents were enqueued before
        return buffer

    # -- the call -------------------------------------------------------------------------------------------
    def attend(self, call: SiteCall) -> SparseResult:
        cfg, branch = self.config, call.cache
        plan = self.plan(call)
        q, k, v = call.q, call.k, call.v
        # key padding (kernel order): the kernels mask its keys, patterns drop its fully masked blocks
        kp = call.key_padding
        order = call.state.token_order  # the whole forward runs in this order (tile_permutation="per_forward")
        ready = order is not None and order[0] is plan.perm  # the inputs are in kernel order already
        if order is not None and not ready:  # another order than this plan's: back to the native one first
            q, k, v = (kernels.permute_tokens(x, order[1]) for x in (q, k, v))
            kp = kp.index_select(1, order[1]) if kp is not None else None
        if plan.perm is not None and not ready:
            q, k, v = (kernels.permute_tokens(x, plan.perm) for x in (q, k, v))
            kp = kp.index_select(1, plan.perm) if kp is not None else None
        shape = (plan.n, *q.shape[:2])
        adaptive = branch.drift_exceeded
        refresh, rebuild = plan_call(cfg, branch, call.state.step, shape)
        pattern = self._build_pattern(call, plan, q, k, kp) if rebuild else branch.pattern
        assert pattern is not None
        if refresh:
            out = self._refresh(call, pattern, q, k, v, kp)
            result = SparseResult(
                out=out, density=1.0, video_density=1.0, kind="refresh", pattern_built=rebuild, adaptive=adaptive
            )
        else:
            out = self._sparse(call, pattern, q, k, v, kp)
            result = SparseResult(
                out=out, density=pattern.density, video_density=pattern.video_density, pattern_built=rebuild
            )
        result.extra_work = self._extra_work(plan, q, v, built=bool(rebuild), linear=not refresh)
        if plan.inv is not None and not ready:
            result.out = kernels.permute_tokens(result.out, plan.inv)
        if order is not None and not ready:
            result.out = kernels.permute_tokens(result.out, order[0])
        return result

    def _extra_work(self, plan: Plan, q: torch.Tensor, v: torch.Tensor, *, built: bool, linear: bool) -> float:
        """FLOPs besides the kept blocks, in dense calls (4 N^2 D): scoring the blocks when the pattern was built
        (pooled q k^T over every block pair: 1 / (block_m block_n); token-gated VMoBA: chunks / N), and SLA's
        linear branch (phi(K)^T V and phi(Q) times it: D_v / N, plus combining the key blocks' states per query
        block: D_v / (block_m block_n) at most)."""
        cfg = self.config
        n, dv = plan.n, v.shape[-1]
        pairs = 1.0 / (cfg.block_m * cfg.block_n)
        work = 0.0
        kind = cfg.pattern.kind
        if built and kind in ("topk", "threshold", "vmoba"):
            tokens = kind == "vmoba" and cfg.vmoba_gate == "token" and plan.groups is not None
            work += plan.groups.n_groups / n if tokens else pairs
        if linear and cfg.compensation.kind == "linear":
            work += dv / n + dv * pairs
        return work

    def _refresh(
        self,
        call: SiteCall,
        pattern: BlockPattern,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kp: torch.Tensor | None,
    ) -> torch.Tensor:
        cfg, branch = self.config, call.cache
        b, h = q.shape[:2]
        step = call.state.step
        branch.refresh_step = step
        branch.drift_exceeded = False
        branch.drift = None
        if not needs_statistics(cfg) and cfg.refresh_drift <= 0:  # no statistics: the fast dense path
            branch.statistics = None
            mask = kp[:, None, None, :] if kp is not None else None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=call.scale)
        idx, counts = self._lut(pattern, b, h)
        o_s, lse_s, o_f, lse_f = kernels.block_sparse_attention_pair(
            q, k, v, idx, counts, block_m=cfg.block_m, block_n=cfg.block_n, scale=call.scale, key_padding=kp,
            key_groups=pattern.key_groups, query_groups=pattern.query_groups,
        )  # fmt: skip
        rho, residual = reshape_statistics(o_s, lse_s, o_f, lse_f)
        old = branch.statistics
        stats = Statistics(pattern=pattern, shape=(q.shape[2], b, h), step=step)
        if cfg.compensation.kind == "reshape":
            stats.residual = self._cache_tensor(
                residual if cfg.cache_dtype != "auto" else residual.to(q.dtype),
                old.residual if old is not None else None,
            )
            stats.rho = rho
            if cfg.compensation.residual_update == "mean":
                stats.value_mean = value_mean(v, kp)
        elif needs_statistics(cfg):
            stats.alpha = rho
        if cfg.refresh_drift > 0:
            stats.lse_ref = lse_s
        branch.statistics = stats
        return o_f

    def _statistics(self, call: SiteCall, pattern: BlockPattern) -> Statistics | None:
        """The branch's statistics when they belong to this pattern (the schedule guarantees it; checked)."""
        stats = call.cache.statistics
        if stats is None:
            return None
        if stats.pattern is not pattern:
            raise RuntimeError(f"site {call.site_name!r}: statistics measured with another pattern (a schedule bug)")
        return stats

    def _sparse(
        self,
        call: SiteCall,
        pattern: BlockPattern,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kp: torch.Tensor | None,
    ) -> torch.Tensor:
        cfg, branch = self.config, call.cache
        b, h, _, d = q.shape
        idx, counts = self._lut(pattern, b, h)
        stats = self._statistics(call, pattern)
        if cfg.compensation.kind == "linear":
            negligible = pattern.negligible
            if negligible is not None and negligible.shape[:2] != (b, h):
                negligible = negligible.expand(b, h, -1, -1)
            o_s, o_l, lse = kernels.sparse_linear_attention(
                q, k, v, idx, counts, block_m=cfg.block_m, block_n=cfg.block_n, negligible=negligible,
                feature_map=cfg.feature_map, scale=call.scale, key_padding=kp, helper_cache=pattern.kernel_cache,
            )  # fmt: skip
            alpha = None
            if cfg.linear_weight == "mass":
                alpha = stats.alpha if stats is not None else None
                if alpha is None:
                    alpha = kernels.kept_mass(
                        q, k, lse, pattern.outside, block_m=cfg.block_m, block_n=cfg.block_n, scale=call.scale,
                        key_padding=kp,
                    )  # fmt: skip
            proj = None
            if self.projections.trained or torch.is_grad_enabled():  # untrained layers are zeros: skipped
                proj = self.projections.get(call.site_index, d, q.device)
            out = combine_linear(o_s, o_l, proj, alpha)
        else:
            reshape: dict = {}
            if cfg.compensation.kind == "reshape":  # rho_c * O + R, fused into the kernel's epilogue
                assert stats is not None and stats.rho is not None and stats.residual is not None
                uses = stats.sparse_uses
                stats.sparse_uses = uses + 1
                residual = stats.residual.to(q.device, non_blocking=True)
                if stats.value_mean is not None:
                    residual = shifted_residual(residual, stats.rho, value_mean(v, kp) - stats.value_mean)
                reshape = dict(rho=stats.rho, residual=residual, rho_add=cfg.ramp * uses, rho_clamp=cfg.rho_clamp)
            out, lse = kernels.block_sparse_attention(
                q, k, v, idx, counts, block_m=cfg.block_m, block_n=cfg.block_n, scale=call.scale, return_lse=True,
                key_padding=kp, key_groups=pattern.key_groups, query_groups=pattern.query_groups, **reshape,
            )  # fmt: skip
        if cfg.refresh_drift > 0 and stats is not None and stats.lse_ref is not None:
            branch.drift = lse_drift(lse, stats.lse_ref)  # read once per forward by the site group
        return out

"""The composed method: pattern x compensation x schedule on the kernels of :mod:`dit_accel.kernels`.

Every seed-method preset (and any mix of parts) runs through :class:`ComposedMethod`. Per call it: takes the
site's plan (token order, groups) from the geometry; reorders q, k, v when the pattern works on 3D tiles or
VMoBA chunks; asks the schedule whether to refresh and whether the cached pattern is still valid; runs the
kernel; applies the compensation; and restores the native token order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .. import kernels
from ..compensation import SLAProjections, combine_linear, reshape_output, reshape_statistics
from ..config import AccelConfig
from ..patterns import GEOMETRIC_PATTERNS, Plan, build_pattern, plan_for
from ..schedule import lse_drift, needs_refresh, needs_statistics, pattern_is_stale
from .base import Method, SiteCall, SparseResult

__all__ = ["CacheBudgetError", "ComposedMethod"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CacheBudgetError(RuntimeError):
    """The cached residuals would exceed ``cache_budget_mb``."""


class ComposedMethod(Method):
    """A pattern, a compensation and a schedule, configured by :class:`AccelConfig`."""

    name = "composed"

    def __init__(self, config: AccelConfig) -> None:
        super().__init__(config)
        self.projections = SLAProjections()
        self._plans: dict[tuple, Plan] = {}
        self._residual_bytes: dict[tuple[int, str], int] = {}

    # -- schedule hooks -------------------------------------------------------------------------------------
    def dense_reason(self, call: SiteCall) -> str | None:
        if self.config.pattern in GEOMETRIC_PATTERNS and (
            call.layout is None or call.layout.total_tokens != call.q.shape[2]
        ):
            return "no_layout"
        return None

    # -- helpers --------------------------------------------------------------------------------------------
    def plan(self, call: SiteCall) -> Plan:
        """The site's token order and groups for this sequence shape (cached: geometry only)."""
        n = call.q.shape[2]
        partition_key = call.site_index % 3 if self.config.pattern == "vmoba" else 0
        key = (partition_key, n, call.layout, call.q.device.type, call.q.device.index)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 64:
                self._plans.clear()
            plan = plan_for(self.config, call.layout, n, call.site_index, call.q.device)
            self._plans[key] = plan
        return plan

    def _lut(self, cache: dict[str, Any], b: int, h: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx, counts = cache["kv_indices"], cache["kv_counts"]
        if idx.shape[0] != b or idx.shape[1] != h:  # a static pattern: expand once, then reuse
            idx = idx.expand(b, h, -1, -1).contiguous()
            counts = counts.expand(b, h, -1).contiguous()
            cache["kv_indices"], cache["kv_counts"] = idx, counts
        return idx, counts

    def _store_pattern(
        self, call: SiteCall, plan: Plan, q: torch.Tensor, k: torch.Tensor, kp: torch.Tensor | None = None
    ) -> None:
        cfg, cache = self.config, call.cache
        pattern = build_pattern(cfg, plan, q, k, call.layout, call.scale, key_padding=kp)
        kv_indices, kv_counts = kernels.lut_from_mask(pattern.mask)
        if pattern.max_count is not None:  # as wide as its longest row can be: the kernels tune by that width
            kv_indices = kv_indices[..., : max(1, pattern.max_count)]
        cache["kv_indices"], cache["kv_counts"] = kv_indices, kv_counts
        if pattern.negligible is not None:
            cache["negligible"] = pattern.negligible
        else:
            cache.pop("negligible", None)
        if cfg.compensation == "linear" and cfg.linear_weight == "mass":
            cache["outside"] = ~pattern.mask
        mask = pattern.mask
        cache["density"] = mask.float().mean()
        if plan.has_video_rows:  # mean over the query blocks holding no text, without boolean indexing (a sync)
            video = (~plan.dense_rows).float()
            cache["video_density"] = (mask.float().mean(dim=(0, 1, 3)) * video).sum() / video.sum()
        else:
            cache["video_density"] = None
        cache["pattern_step"] = call.state.step
        cache["pattern_n"] = (plan.n, *q.shape[:2])
        cache["pattern_static"] = pattern.static

    def _check_budget(self, call: SiteCall, nbytes: int) -> None:
        budget = self.config.cache_budget_mb
        key = (call.site_index, call.state.branch)
        others = sum(v for kk, v in self._residual_bytes.items() if kk != key)
        if budget is not None and others + nbytes > budget * 2**20:
            raise CacheBudgetError(
                f"cache_budget_mb={budget!r} is too small: the Re-ttention residual of site {call.site_name!r} "
                f"(branch {call.state.branch!r}) needs {nbytes / 2**20:.1f} MiB on top of {others / 2**20:.1f} MiB "
                "cached by other sites and branches; raise cache_budget_mb, set cache_dtype='bfloat16', "
                "keep more layers dense (dense_layers) or use a method without a residual cache"
            )
        self._residual_bytes[key] = nbytes

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
        cfg, cache = self.config, call.cache
        step = call.state.step
        plan = self.plan(call)
        q, k, v = call.q, call.k, call.v
        # key padding (kernel order): the kernels mask its keys, patterns drop its fully masked blocks
        kp = call.key_padding
        if plan.perm is not None:
            q, k, v = (kernels.permute_tokens(x, plan.perm) for x in (q, k, v))
            kp = kp.index_select(1, plan.perm) if kp is not None else None
        shape = (plan.n, *q.shape[:2])
        refresh = needs_refresh(cfg, cache, step, shape)
        built = pattern_is_stale(cfg, cache, step, refresh, shape)
        if built:
            self._store_pattern(call, plan, q, k, kp)
        if refresh:
            out = self._refresh(call, q, k, v, kp)
            result = SparseResult(out=out, density=1.0, video_density=1.0, kind="refresh", pattern_built=built)
        else:
            out, lse = self._sparse(call, q, k, v, kp)
            result = SparseResult(
                out=out, density=cache["density"], video_density=cache["video_density"], pattern_built=built
            )
            if cfg.refresh_drift > 0 and "lse_ref" in cache and lse_drift(lse, cache["lse_ref"]) > cfg.refresh_drift:
                self._store_pattern(call, plan, q, k, kp)
                out = self._refresh(call, q, k, v, kp)
                result = SparseResult(
                    out=out, density=1.0, video_density=1.0, kind="refresh", pattern_built=True, adaptive=True
                )
        if plan.inv is not None:
            result.out = kernels.permute_tokens(result.out, plan.inv)
        return result

    def _refresh(
        self, call: SiteCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor | None = None
    ) -> torch.Tensor:
        cfg, cache = self.config, call.cache
        b, h = q.shape[:2]
        cache["refresh_step"] = call.state.step
        cache["refresh_shape"] = (q.shape[2], b, h)
        cache["sparse_since_refresh"] = 0
        if not needs_statistics(cfg) and cfg.refresh_drift <= 0:  # no statistics: the fast dense path
            mask = kp[:, None, None, :] if kp is not None else None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=call.scale)
        idx, counts = self._lut(cache, b, h)
        o_s, lse_s, o_f, lse_f = kernels.block_sparse_attention_pair(
            q, k, v, idx, counts, block_m=cfg.block_m, block_n=cfg.block_n, scale=call.scale, key_padding=kp
        )
        rho, residual = reshape_statistics(o_s, lse_s, o_f, lse_f)
        if cfg.compensation == "reshape":
            residual = self._cache_tensor(
                residual if cfg.cache_dtype != "auto" else residual.to(q.dtype), cache.get("residual")
            )
            self._check_budget(call, residual.numel() * residual.element_size())
            cache["rho"] = rho
            cache["residual"] = residual
        elif needs_statistics(cfg):
            cache["alpha"] = rho
        if cfg.refresh_drift > 0:
            cache["lse_ref"] = lse_s
        return o_f

    def _sparse(
        self, call: SiteCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, cache = self.config, call.cache
        b, h, _, d = q.shape
        idx, counts = self._lut(cache, b, h)
        if cfg.compensation == "linear":
            negligible = cache.get("negligible")
            if negligible is not None and negligible.shape[:2] != (b, h):
                negligible = negligible.expand(b, h, -1, -1)
            o_s, o_l, lse = kernels.sparse_linear_attention(
                q, k, v, idx, counts, block_m=cfg.block_m, block_n=cfg.block_n, negligible=negligible,
                feature_map=cfg.feature_map, scale=call.scale, key_padding=kp,
            )  # fmt: skip
            alpha = None
            if cfg.linear_weight == "mass":
                alpha = cache.get("alpha")
                if alpha is None:
                    alpha = kernels.kept_mass(
                        q, k, lse, cache["outside"], block_m=cfg.block_m, block_n=cfg.block_n, scale=call.scale,
                        key_padding=kp,
                    )  # fmt: skip
            proj = None
            if self.projections.trained or torch.is_grad_enabled():  # untrained layers are zeros: skipped
                proj = self.projections.get(call.site_index, d, q.device)
            return combine_linear(o_s, o_l, proj, alpha), lse
        o_s, lse = kernels.block_sparse_attention(
            q, k, v, idx, counts, block_m=cfg.block_m, block_n=cfg.block_n, scale=call.scale, return_lse=True,
            key_padding=kp,
        )  # fmt: skip
        if cfg.compensation == "reshape":
            uses = cache["sparse_since_refresh"]
            cache["sparse_since_refresh"] = uses + 1
            residual = cache["residual"].to(q.device, non_blocking=True)
            out = reshape_output(o_s, cache["rho"], residual, ramp=cfg.ramp, uses=uses, clamp=cfg.rho_clamp)
            return out, lse
        return o_s, lse

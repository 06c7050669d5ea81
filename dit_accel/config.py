"""Configuration: one validated dataclass for every method, and the named presets.

A method is a preset of parts (pattern x compensation x schedule); presets only set defaults, so every option
can be overridden through ``accelerate(pipe, method, **options)``. Bad values raise ``ValueError`` naming the
parameter, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AccelConfig", "METHODS", "DEFAULT_METHOD", "PRESETS", "parse_layers", "resolve_config"]

SUPPORTED_BLOCK_SIZES = (64, 128)
DENSE_BACKENDS = ("sdpa", "xformers")


def parse_layers(value: str | list[int] | tuple[int, ...] | None, name: str = "dense_layers") -> tuple[int, ...]:
    """Layer indices from a list or a string of indices and ranges such as ``"0,1,28-29"``."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        out: list[int] = []
        for part in value.replace(" ", "").split(","):
            if not part:
                continue
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if match is None:
                raise ValueError(f"{name}={value!r}: {part!r} is not an index or a range like '28-29'")
            lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
            if hi < lo:
                raise ValueError(f"{name}={value!r}: range {part!r} is descending")
            out.extend(range(lo, hi + 1))
        return tuple(sorted(set(out)))
    try:
        items = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a list of layer indices or a string like '0,1,28-29'") from None
    if any(v < 0 for v in items) or any(int(v) != v for v in value):
        raise ValueError(f"{name}={value!r} must hold non-negative integer layer indices")
    return tuple(sorted(set(items)))


@dataclass(frozen=True)
class _ConfigFields:
    """Every option of every method (the fields of :class:`AccelConfig`, which documents them)."""

    method: str = "rettention"
    sparsity: float = 0.75
    block_m: int = 64
    block_n: int = 64
    min_tokens: int = 1024
    dense_steps: int | float = 0
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    num_steps: int | None = None
    smooth_k: bool = True
    sink_blocks: int = 0
    dense_backend: str = "sdpa"
    pattern: str = "topk"
    tiled: bool = False
    compensation: str = "none"
    tau: float = 0.9
    threshold_scope: str = "row"
    tile: tuple[int, int, int] | None = None
    window: tuple[int, int, int] | None = None
    raster_fraction: float | None = None
    vmoba_chunks: tuple[tuple[int, ...], ...] = ((7,), (6, 4), (3, 6, 4))
    vmoba_select: str = "topk"
    vmoba_topk: tuple[int, int, int] | None = None
    ramp: float = 0.0
    rho_clamp: bool = True
    feature_map: str = "softmax"
    negligible: float = 0.0
    linear_weight: str = "mass"
    refresh_every: int = 0
    reuse_pattern_every: int = 1
    refresh_drift: float = 0.0
    cache_dtype: str = "auto"
    cache_offload: bool = False
    cache_budget_mb: float | None = None


class AccelConfig(_ConfigFields):
    """Every option of every method: the preset of ``method`` (:data:`PRESETS`) plus the fields given.

    ``AccelConfig(sparsity=0.9)`` is the default method's preset with ``sparsity=0.9``; a field left out takes
    the preset's value, so a base config passed to ``accelerate(pipe, method, config=...)`` overrides only the
    fields it was built with (:attr:`explicit_fields`).

    Attributes:
        method: a name from :data:`METHODS`.
        sparsity: fraction of key blocks skipped per query block, in [0, 1).
        block_m: query block size of the kernels (64 or 128).
        block_n: key block size of the kernels (64 or 128).
        min_tokens: sequences shorter than this stay dense (reason ``min_tokens``).
        dense_steps: steps kept dense at the start; an int count or a float fraction of the steps (1.0 = all).
        dense_layers: attention sites (by layer index) kept dense; a list or a string like ``"0,1,28-29"``.
        num_steps: number of denoising steps when no scheduler tells it (bare transformers).
        smooth_k: subtract the mean key before pooling (SageAttention's smooth-K) when scoring blocks.
        sink_blocks: number of leading key blocks always attended.
        dense_backend: what computes dense calls: ``sdpa`` (the model's own call, bit-exact) or ``xformers``
            (memory-efficient attention from the optional ``xformers`` extra; must be installed).

    Parts of the composed methods (see ``docs/methods.md``; every density knob left None follows ``sparsity``):
        pattern: which key blocks each query block attends to: ``topk`` (pooled top-k), ``threshold``
            (cumulative pooled softmax mass ``tau``), ``window`` (3D window on tiles, clipped at borders),
            ``inward`` (FreeSwim: 3D window on tiles shifted inward at borders), ``raster`` (Re-ttention's 1D
            band at the same in-frame positions of every frame) or ``vmoba`` (1D/2D/3D chunks cycling with the
            layer index).
        tiled: for ``topk`` and ``threshold``, reorder the video tokens into 3D tiles first, so that each block
            is a compact 3D neighbourhood whose mean represents it (``window``, ``inward`` and ``vmoba`` always
            reorder; ``raster`` never does).
        compensation: what replaces the skipped mass: ``none``, ``reshape`` (Re-ttention rho and residual,
            cached at refresh steps) or ``linear`` (SLA linear attention over the non-selected blocks).
        tau: cumulative mass of the ``threshold`` pattern and of ``vmoba_select="threshold"``, in (0, 1].
        threshold_scope: ``row`` (per query block) or ``head`` (all pairs of a head share one budget).
        tile: 3D tile (frames, rows, cols) of the geometric patterns; None picks one whose volume is the
            smaller block size and that wastes the fewest tokens on the grid.
        window: window extent in tiles (frames, rows, cols); None derives it from ``sparsity``.
        raster_fraction: Re-ttention band width as a fraction of a frame's tokens; None means 1 - sparsity.
        vmoba_chunks: chunk counts per partition: (frames,) for 1D, (rows, cols) for 2D, (frames, rows, cols)
            for 3D; layer ``l`` uses partition ``l % 3``.
        vmoba_select: ``topk`` (local + top-k per query block, the paper's training-free mode) or
            ``threshold`` (global per-head selection of pairs up to ``tau``, the paper's trained mode).
        vmoba_topk: chunks kept per query block for the three partitions; None derives them from ``sparsity``.
        ramp: Re-ttention's lambda added to rho after each sparse step since the refresh.
        rho_clamp: clamp the ramped rho at 1 (the paper does not).
        feature_map: phi of the SLA linear branch: ``softmax`` (over the head dim) or ``elu`` (elu + 1).
        negligible: fraction of each row's lowest-scoring blocks SLA skips entirely, in [0, 1).
        linear_weight: ``proj`` (paper: O_s + proj(O_l), proj zero-initialised, needs fine-tuning) or
            ``mass`` (training-free: alpha O_s + (1 - alpha) O_l + proj(O_l), alpha the kept softmax mass,
            from the last refresh when there is one, else estimated from the block means).
        refresh_every: a full-attention refresh (statistics recollected, pattern rebuilt) every k steps after
            the dense steps; 0 means only when a method has no statistics yet; 1 means every step.
        reuse_pattern_every: rebuild a site's pattern every k steps and reuse it in between (reshape reuses the
            pattern from refresh to refresh, since rho and R belong to it).
        refresh_drift: adaptive refresh: refresh when the mean absolute change of the sparse branch's LSE since
            the last refresh exceeds this many nats; 0 disables it.
        cache_dtype: dtype of the cached residual: ``auto`` (the input's), ``float32``, ``bfloat16``,
            ``float16``.
        cache_offload: keep the cached residual on the CPU between steps.
        cache_budget_mb: refuse (``CacheBudgetError``) when the residual caches of all sites and branches would
            exceed this many MiB; None means no limit.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = [f.name for f in dataclasses.fields(_ConfigFields)]
        if len(args) > len(names):
            raise TypeError(f"AccelConfig takes at most {len(names)} positional arguments")
        explicit = frozenset(names[: len(args)]) | frozenset(kwargs)
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "_explicit", explicit)
        preset = PRESETS.get(self.method, {})
        for name, value in preset.items():
            if name not in explicit:
                object.__setattr__(self, name, value)
        self.__post_init__()

    @property
    def explicit_fields(self) -> frozenset[str]:
        """The fields this config was built with (the others come from the preset of ``method``)."""
        return self._explicit  # type: ignore[attr-defined]

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_layers", parse_layers(self.dense_layers))
        for name in ("tile", "window", "vmoba_topk"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.vmoba_chunks, list) or any(isinstance(c, list) for c in self.vmoba_chunks):
            object.__setattr__(self, "vmoba_chunks", tuple(tuple(c) for c in self.vmoba_chunks))
        self.validate()

    def validate(self) -> None:
        if self.dense_backend not in DENSE_BACKENDS:
            raise ValueError(f"dense_backend={self.dense_backend!r} is unknown; allowed: {', '.join(DENSE_BACKENDS)}")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; available: {', '.join(METHODS)}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"sparsity={self.sparsity!r} must be a number in [0, 1)")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity={self.sparsity!r} is outside [0, 1)")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value not in SUPPORTED_BLOCK_SIZES:
                raise ValueError(f"{name}={value!r} is not supported by the kernels; allowed: {SUPPORTED_BLOCK_SIZES}")
        _non_negative_int("min_tokens", self.min_tokens)
        _non_negative_int("sink_blocks", self.sink_blocks)
        if self.num_steps is not None:
            _non_negative_int("num_steps", self.num_steps)
        ds = self.dense_steps
        if isinstance(ds, bool) or not isinstance(ds, (int, float)):
            raise ValueError(f"dense_steps={ds!r} must be an int count or a float fraction in [0, 1]")
        if isinstance(ds, float) and not 0.0 <= ds <= 1.0:
            raise ValueError(f"dense_steps={ds!r}: a float is a fraction of the steps and must be in [0, 1]")
        if isinstance(ds, int) and ds < 0:
            raise ValueError(f"dense_steps={ds!r} must not be negative")
        self._validate_parts()

    def _validate_parts(self) -> None:
        _choice("pattern", self.pattern, PATTERNS)
        _choice("compensation", self.compensation, COMPENSATIONS)
        _choice("threshold_scope", self.threshold_scope, ("row", "head"))
        _choice("vmoba_select", self.vmoba_select, ("topk", "threshold"))
        _choice("feature_map", self.feature_map, ("softmax", "elu"))
        _choice("linear_weight", self.linear_weight, ("proj", "mass"))
        _choice("cache_dtype", self.cache_dtype, ("auto", "float32", "bfloat16", "float16"))
        _number("tau", self.tau, 0.0, 1.0, "(0, 1]", low_open=True)
        _number("negligible", self.negligible, 0.0, 1.0, "[0, 1)", high_open=True)
        _number("ramp", self.ramp, 0.0, 1.0, "[0, 1]")
        _number("refresh_drift", self.refresh_drift, 0.0, float("inf"), "[0, inf)")
        if self.raster_fraction is not None:
            _number("raster_fraction", self.raster_fraction, 0.0, 1.0, "(0, 1] or None", low_open=True)
        if self.cache_budget_mb is not None:
            _number("cache_budget_mb", self.cache_budget_mb, 0.0, float("inf"), "a number >= 0 or None")
        for name in ("tile", "window"):
            _positive_triple(name, getattr(self, name))
        _non_negative_int("refresh_every", self.refresh_every)
        if isinstance(self.reuse_pattern_every, bool) or not isinstance(self.reuse_pattern_every, int):
            raise ValueError(f"reuse_pattern_every={self.reuse_pattern_every!r} must be an integer >= 1")
        if self.reuse_pattern_every < 1:
            raise ValueError(f"reuse_pattern_every={self.reuse_pattern_every!r} must be >= 1 (1 rebuilds every step)")
        for name in ("rho_clamp", "cache_offload", "tiled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        chunks = self.vmoba_chunks
        if (
            not isinstance(chunks, tuple)
            or len(chunks) != 3
            or [len(c) if isinstance(c, tuple) else -1 for c in chunks] != [1, 2, 3]
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for c in chunks for n in c)
        ):
            raise ValueError(
                f"vmoba_chunks={chunks!r} must be three tuples of positive chunk counts: (frames,), (rows, cols), "
                "(frames, rows, cols), e.g. ((7,), (6, 4), (3, 6, 4))"
            )
        if self.vmoba_topk is not None:
            topk = self.vmoba_topk
            if (
                not isinstance(topk, tuple)
                or len(topk) != 3
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in topk)
            ):
                raise ValueError(f"vmoba_topk={topk!r} must be None or three positive chunk counts like (2, 6, 18)")

    def dense_step_count(self, num_steps: int | None) -> int:
        """How many leading steps stay dense for a generation of ``num_steps`` steps."""
        if isinstance(self.dense_steps, float):
            if num_steps is None:
                return 0 if self.dense_steps == 0.0 else 1 << 30
            return int(round(self.dense_steps * num_steps))
        return int(self.dense_steps)

    def replace(self, **changes: Any) -> AccelConfig:
        """A copy with ``changes``; fields not set before still count as unset (see :attr:`explicit_fields`)."""
        values = {name: getattr(self, name) for name in self.explicit_fields}
        values.update(changes)
        return AccelConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dense_layers"] = list(self.dense_layers)
        return out


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer")


PATTERNS = ("topk", "threshold", "window", "inward", "raster", "vmoba")
COMPENSATIONS = ("none", "reshape", "linear")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _number(
    name: str, value: Any, lo: float, hi: float, allowed: str, *, low_open: bool = False, high_open: bool = False
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name}={value!r} must be a number in {allowed}")
    bad_lo = value <= lo if low_open else value < lo
    bad_hi = value >= hi if high_open else value > hi
    if bad_lo or bad_hi:
        raise ValueError(f"{name}={value!r} is outside {allowed}")


def _positive_triple(name: str, value: Any) -> None:
    if value is None:
        return
    if (
        not isinstance(value, tuple)
        or len(value) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise ValueError(f"{name}={value!r} must be None or three positive integers (frames, rows, cols)")


#: Per-method defaults. The seed-method presets are added by :mod:`dit_accel.methods`.
PRESETS: dict[str, dict[str, Any]] = {
    "dense": {"sparsity": 0.0},
    "blocktopk": {"sparsity": 0.75},
}
METHODS: list[str] = list(PRESETS)
DEFAULT_METHOD = "rettention"  # chosen by scripts/method_error.py; evidence in docs/methods.md


def register_preset(name: str, defaults: dict[str, Any]) -> None:
    """Add a named preset (used by the method modules when they are imported)."""
    PRESETS[name] = dict(defaults)
    if name not in METHODS:
        METHODS.append(name)


def resolve_config(method: str | None = None, config: AccelConfig | None = None, **options: Any) -> AccelConfig:
    """Merge preset defaults, an optional base config and keyword overrides into a validated config."""
    allowed = {f.name for f in dataclasses.fields(AccelConfig)} - {"method"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")
    if config is not None and not isinstance(config, AccelConfig):
        raise TypeError(f"config must be an AccelConfig, got {type(config).__name__}")
    if method is None:
        method = config.method if config is not None else DEFAULT_METHOD
    if method not in PRESETS:
        raise ValueError(f"method={method!r} is unknown; available: {', '.join(METHODS)}")
    if config is not None and config.method == method:
        return config.replace(**options)
    values = dict(PRESETS[method])
    if config is not None:  # a base config of another method overrides only the fields it was built with
        values.update({name: getattr(config, name) for name in config.explicit_fields if name != "method"})
    values.update(options)
    return AccelConfig(method=method, **values)

"""Configuration: :class:`AccelConfig`, the one validated config of every method, built from a preset's typed parts.

A method is a :class:`~dit_accel.presets.Preset` of parts (:class:`PatternConfig` x :class:`CompensationConfig`
x :class:`ScheduleConfig`); presets only set defaults, so every option can be overridden, either flat through
``accelerate(pipe, method, **options)`` (each option goes to the part that owns it) or as a whole typed part
(``pattern=PatternConfig(...)``). Bad values raise ``ValueError`` naming the parameter, the value and what is
allowed; an option given with a value that does not apply to the chosen parts (``tau`` with a top-k pattern)
is refused the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

from .kernels.backends import check_backend
from .parts import (
    COMPENSATIONS,
    PATTERNS,
    SCORED_PATTERNS,
    CompensationConfig,
    PatternConfig,
    ScheduleConfig,
    _choice,
    parse_layers,
)
from .presets import DEFAULT_METHOD, METHODS, PRESETS, Preset

__all__ = [
    "AccelConfig",
    "CompensationConfig",
    "DEFAULT_METHOD",
    "METHODS",
    "PRESETS",
    "PatternConfig",
    "Preset",
    "ScheduleConfig",
    "parse_layers",
    "resolve_config",
]

DENSE_BACKENDS = ("sdpa", "xformers")
#: where the 3D-tile permutation of the tokens happens: gathered and scattered back around each sparse call, or
#: once per transformer forward (the model's hidden states in tile order between its first block and its output
#: projection; families that support it only, see :mod:`dit_accel.pipelines.token_order`)
TILE_PERMUTATIONS = ("per_call", "per_forward")

Part = PatternConfig | CompensationConfig | ScheduleConfig
_PART_TYPES: dict[str, type[Any]] = {
    "pattern": PatternConfig,
    "compensation": CompensationConfig,
    "schedule": ScheduleConfig,
}


def _part_flat_names(part: str) -> tuple[str, ...]:
    """The flat option names of a part's fields (the kind goes by the part's own name)."""
    return tuple(part if f.name == "kind" else f.name for f in dataclasses.fields(_PART_TYPES[part]))


#: flat option name -> the part that owns it (``pattern`` and ``compensation`` name the kinds)
OWNER: dict[str, str] = {name: part for part in _PART_TYPES for name in _part_flat_names(part)}
#: every flat option, in the order of :meth:`AccelConfig.to_dict` (the order of the old flat dataclass)
FLAT_OPTIONS: tuple[str, ...] = (
    "method", "sparsity", "block_m", "block_n", "min_tokens", "dense_steps", "dense_layers", "num_steps", "smooth_k",
    "sink_blocks", "self_block", "keep_rounding", "dense_backend", "pattern", "tiled", "compensation", "tau",
    "threshold_scope", "tile", "window", "raster_fraction", "vmoba_chunks", "vmoba_select", "vmoba_topk",
    "vmoba_chunk_size", "vmoba_gate", "vmoba_scope", "ramp", "rho_clamp", "residual_update", "feature_map",
    "negligible", "linear_weight", "refresh_every", "reuse_pattern_every", "refresh_drift", "cache_dtype",
    "cache_offload", "cache_budget_mb", "kernel_backend", "tile_permutation",
)  # fmt: skip
#: the options that belong to no part (the integration's choices)
TOP_LEVEL: tuple[str, ...] = ("dense_backend", "kernel_backend", "tile_permutation")
#: every option ``accelerate`` and :class:`AccelConfig` take besides ``method``
ALLOWED: tuple[str, ...] = tuple(sorted(set(FLAT_OPTIONS) - {"method"} | {"schedule"}))
KINDS: dict[str, tuple[str, ...]] = {"pattern": PATTERNS, "compensation": COMPENSATIONS}

T = TypeVar("T")


class _Flat(Generic[T]):
    """Read-only flat view of one field of a part: ``config.sparsity`` is ``config.pattern.sparsity``."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _Flat[T]: ...
    @overload
    def __get__(self, obj: object, objtype: type | None = None) -> T: ...
    def __get__(self, obj: object | None, objtype: type | None = None) -> T | _Flat[T]:
        if obj is None:
            return self
        return getattr(getattr(obj, self.part), self.name)


def _merge(values: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` updated by ``changes``; a typed part in ``changes`` replaces every flat option of that part."""
    out = dict(values)
    for part, cls in _PART_TYPES.items():
        if isinstance(changes.get(part), cls):
            for name in _part_flat_names(part):
                out.pop(name, None)
    out.update(changes)
    return out


@dataclass(frozen=True, init=False)
class AccelConfig:
    """Every option of a method: the parts of the preset ``method`` (:data:`PRESETS`), changed by what is given.

    ``AccelConfig(sparsity=0.9)`` is the default method's preset with ``sparsity=0.9``. Options can be given
    flat (each goes to the part that owns it; ``pattern="threshold"`` and ``compensation="linear"`` switch a
    part's kind) or as whole typed parts (``pattern=PatternConfig(kind="topk", sparsity=0.9)``, which replaces
    the preset's pattern; flat options given with it change that part further).

    An option that does not apply to the chosen parts (``tau`` with pattern ``topk``, ``feature_map`` without
    the linear compensation, ``ramp`` without reshape, ``negligible`` with an unscored pattern) must stay at
    its default: given with another value it raises ``ValueError`` naming it and the part it needs. Values that
    came from the preset are dropped instead when you switch a part's kind (``AccelConfig(method="vmoba-paper",
    pattern="topk")`` forgets the preset's ``vmoba_topk``).

    A field left out takes the preset's value, so a base config passed to ``accelerate(pipe, method,
    config=...)`` overrides only the fields it was built with (:attr:`explicit_fields`).

    Attributes:
        method: a name from :data:`METHODS`.
        pattern: which key blocks each query block attends to (:class:`PatternConfig`, kind in ``.kind``).
        compensation: what stands in for the skipped blocks (:class:`CompensationConfig`).
        schedule: dense steps and layers, refreshes, pattern reuse (:class:`ScheduleConfig`).
        dense_backend: what computes dense calls: ``sdpa`` (the model's own call, bit-exact) or ``xformers``
            (memory-efficient attention from the optional ``xformers`` extra; must be installed).
        kernel_backend: what computes the sparse calls: ``auto`` (default: the attention functions time their
            candidates on the first call per shape and density bucket, each checked against the exact reference,
            and keep the fastest; :mod:`dit_accel.kernels.auto`) or a backend name forcing it (``triton``,
            ``flex``, ``fa4``, ``flex_flash``, ``cudnn_bsa``, ``cpu``, ``reference``; the optional three need CUDA
            and ``flash-attn-4`` or ``nvidia-cudnn-frontend``). It wins over ``DIT_ACCEL_KERNELS``, which replaces
            ``auto`` only.
        tile_permutation: ``per_call`` (default: q, k, v gathered into 3D tiles and the output scattered back at
            each sparse call) or ``per_forward`` (the hidden states permuted once per transformer forward; Wan
            only, with patterns whose tile order is the same at every layer).

    Every field of the parts also reads flat, as before: ``config.sparsity``, ``config.ramp``,
    ``config.refresh_every``, ... (see the parts for what each means).
    """

    method: str
    pattern: PatternConfig
    compensation: CompensationConfig
    schedule: ScheduleConfig
    dense_backend: str
    kernel_backend: str
    tile_permutation: str

    # -- flat read access: the fields of the parts --------------------------------------------------------------
    sparsity = _Flat[float]("pattern")
    block_m = _Flat[int]("pattern")
    block_n = _Flat[int]("pattern")
    smooth_k = _Flat[bool]("pattern")
    sink_blocks = _Flat[int]("pattern")
    self_block = _Flat[bool]("pattern")
    keep_rounding = _Flat[str]("pattern")
    tiled = _Flat[bool]("pattern")
    tau = _Flat[float]("pattern")
    threshold_scope = _Flat[str]("pattern")
    tile = _Flat["tuple[int, int, int] | None"]("pattern")
    window = _Flat["tuple[int, int, int] | None"]("pattern")
    raster_fraction = _Flat["float | None"]("pattern")
    vmoba_chunks = _Flat["tuple[tuple[int, ...], ...]"]("pattern")
    vmoba_select = _Flat[str]("pattern")
    vmoba_topk = _Flat["tuple[int, int, int] | None"]("pattern")
    vmoba_chunk_size = _Flat["tuple[tuple[int, ...], ...] | None"]("pattern")
    vmoba_gate = _Flat[str]("pattern")
    vmoba_scope = _Flat[str]("pattern")
    ramp = _Flat[float]("compensation")
    rho_clamp = _Flat[bool]("compensation")
    residual_update = _Flat[str]("compensation")
    feature_map = _Flat[str]("compensation")
    linear_weight = _Flat[str]("compensation")
    negligible = _Flat[float]("compensation")
    cache_dtype = _Flat[str]("compensation")
    cache_offload = _Flat[bool]("compensation")
    cache_budget_mb = _Flat["float | None"]("compensation")
    dense_steps = _Flat["int | float"]("schedule")
    dense_layers = _Flat["tuple[int, ...]"]("schedule")
    min_tokens = _Flat[int]("schedule")
    num_steps = _Flat["int | None"]("schedule")
    refresh_every = _Flat[int]("schedule")
    reuse_pattern_every = _Flat[int]("schedule")
    refresh_drift = _Flat[float]("schedule")

    def __init__(
        self,
        method: str | None = None,
        *,
        pattern: str | PatternConfig | None = None,
        compensation: str | CompensationConfig | None = None,
        schedule: ScheduleConfig | None = None,
        dense_backend: str | None = None,
        kernel_backend: str | None = None,
        tile_permutation: str | None = None,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(OWNER))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(ALLOWED)}")
        named = {
            "method": method, "dense_backend": dense_backend, "kernel_backend": kernel_backend,
            "tile_permutation": tile_permutation,
        }  # fmt: skip
        explicit = set(options) | {name for name, value in named.items() if value is not None}
        method = DEFAULT_METHOD if method is None else method
        if method not in PRESETS:
            raise ValueError(f"method={method!r} is unknown; available: {', '.join(METHODS)}")
        backend = "sdpa" if dense_backend is None else dense_backend
        if backend not in DENSE_BACKENDS:
            raise ValueError(f"dense_backend={backend!r} is unknown; allowed: {', '.join(DENSE_BACKENDS)}")
        kernels = check_backend("auto" if kernel_backend is None else kernel_backend, "kernel_backend")
        order = "per_call" if tile_permutation is None else tile_permutation
        _choice("tile_permutation", order, TILE_PERMUTATIONS)
        preset = PRESETS[method]
        given = {"pattern": pattern, "compensation": compensation, "schedule": schedule}
        values: dict[str, dict[str, Any]] = {}
        for part in _PART_TYPES:
            base, kind = _part_argument(part, given[part], getattr(preset, part))
            if given[part] is not None:
                explicit.update(_part_flat_names(part) if kind is None else (part,))
            part_values = dict(vars(base))
            if kind is not None:
                part_values["kind"] = kind
            part_values.update({name: options[name] for name in _part_flat_names(part) if name in options})
            values[part] = part_values
        user = explicit & set(OWNER)
        for part in ("pattern", "compensation"):
            _drop_preset_leftovers(_PART_TYPES[part], values[part], user)
        _check_negligible(values["pattern"], values["compensation"], user)
        _check_vmoba_gate(values["pattern"], values["compensation"])
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "pattern", PatternConfig(**values["pattern"]))
        object.__setattr__(self, "compensation", CompensationConfig(**values["compensation"]))
        object.__setattr__(self, "schedule", ScheduleConfig(**values["schedule"]))
        object.__setattr__(self, "dense_backend", backend)
        object.__setattr__(self, "kernel_backend", kernels)
        object.__setattr__(self, "tile_permutation", order)
        _check_tile_permutation(self)
        object.__setattr__(self, "_explicit", frozenset(explicit))

    @property
    def explicit_fields(self) -> frozenset[str]:
        """The flat options this config was built with (the others come from the preset of ``method``); a typed
        part counts as all of its options."""
        return self._explicit  # type: ignore[attr-defined]

    @property
    def preset(self) -> Preset:
        return PRESETS[self.method]

    def for_family(self, family: str | None) -> AccelConfig:
        """This config as it runs on model ``family``: the preset's schedule for that family (a paper's schedule
        is set per model, see :attr:`Preset.family_schedules`) with the schedule fields you gave on top; itself
        when the preset has none for it or you gave a whole schedule."""
        schedule = self.preset.family_schedules.get(family) if family is not None else None
        names = set(_part_flat_names("schedule"))
        given = self.explicit_fields & names
        if schedule is None or given == names:
            return self
        schedule = dataclasses.replace(schedule, **{name: getattr(self.schedule, name) for name in given})
        out = object.__new__(AccelConfig)
        for name in ("method", "pattern", "compensation", *TOP_LEVEL):
            object.__setattr__(out, name, getattr(self, name))
        object.__setattr__(out, "schedule", schedule)
        object.__setattr__(out, "_explicit", self.explicit_fields)
        return out

    def dense_step_count(self, num_steps: int | None) -> int:
        """How many leading steps stay dense for a generation of ``num_steps`` steps."""
        return self.schedule.dense_step_count(num_steps)

    def flat(self, name: str) -> Any:
        """The value of flat option ``name`` (``pattern`` and ``compensation`` give the kind)."""
        if name in ("pattern", "compensation"):
            return getattr(self, name).kind
        return getattr(self, name)

    def replace(self, **changes: Any) -> AccelConfig:
        """A copy with ``changes`` (flat options or typed parts); options not set before still count as unset
        (see :attr:`explicit_fields`)."""
        values = {name: self.flat(name) for name in self.explicit_fields}
        return AccelConfig(**_merge(values, changes))

    def to_dict(self, nested: bool = False) -> dict[str, Any]:
        """Every option by its flat name (the shape stats and sweep records use); ``nested=True`` gives
        ``{"method", "dense_backend", "kernel_backend", "tile_permutation", "pattern": {...}, "compensation":
        {...}, "schedule": {...}}`` instead,
        whose part dicts rebuild the parts (``PatternConfig(**d["pattern"])``)."""
        if nested:
            out: dict[str, Any] = {"method": self.method, **{name: getattr(self, name) for name in TOP_LEVEL}}
            for part in _PART_TYPES:
                out[part] = dataclasses.asdict(getattr(self, part))
            out["schedule"]["dense_layers"] = list(self.dense_layers)
            return out
        flat = {name: self.flat(name) for name in FLAT_OPTIONS}
        flat["dense_layers"] = list(self.dense_layers)
        return flat


def _check_tile_permutation(config: AccelConfig) -> None:
    """``per_forward`` permutes the hidden states once for every layer, so every layer must use the same tile
    order: the 3D-tile patterns (window, inward, tiled top-k / threshold). VMoBA's order changes per layer."""
    if config.tile_permutation == "per_call":
        return
    kind = config.pattern.kind
    tiled = kind in ("window", "inward") or kind in SCORED_PATTERNS and config.pattern.tiled
    if not tiled:
        raise ValueError(
            f"tile_permutation={config.tile_permutation!r} does not apply to pattern {kind!r}"
            f"{' with tiled=False' if kind in SCORED_PATTERNS else ''}: it needs one 3D-tile order for every layer "
            "(pattern 'window' or 'inward', or 'topk' / 'threshold' with tiled=True); use 'per_call'"
        )


def _drop_preset_leftovers(cls: type[Any], values: dict[str, Any], user: set[str]) -> None:
    """Reset the fields of ``values`` that do not apply to its kind and were not given by the user.

    A preset's values fit the preset's own kinds; when the user switches a kind they are forgotten silently.
    Fields the user gave stay, so that the part refuses them if their value does not apply.
    """
    defaults = cls.defaults()
    if values["kind"] not in (PATTERNS if cls is PatternConfig else COMPENSATIONS):
        return  # the part refuses the kind itself
    for name in cls.RULES:  # in rule order: tiled and vmoba_select first, as later rules read them
        if name not in user and cls.requirement(name, values) is not None:
            values[name] = defaults[name]


def _part_argument(part: str, arg: Any, preset_part: Part) -> tuple[Part, str | None]:
    """The base a part starts from and, when ``arg`` names a kind, that kind.

    A typed part replaces the preset's part; a kind name (``pattern="threshold"``) switches the preset's part to
    that kind; None keeps the preset's part.
    """
    cls = _PART_TYPES[part]
    if isinstance(arg, cls):
        return arg, None
    if arg is None:
        return preset_part, None
    if isinstance(arg, str) and part in KINDS:
        _choice(part, arg, KINDS[part])
        return preset_part, arg
    kinds = f"one of {', '.join(map(repr, KINDS[part]))} or " if part in KINDS else ""
    raise ValueError(f"{part}={arg!r} must be {kinds}a {cls.__name__}")


def _check_negligible(pattern: dict[str, Any], compensation: dict[str, Any], user: set[str]) -> None:
    """``negligible`` ranks pooled block scores, so it needs a scored pattern (a rule across two parts)."""
    if compensation["kind"] != "linear" or compensation["negligible"] == 0.0:
        return  # without the linear branch the compensation part itself refuses a given value
    if pattern["kind"] not in PATTERNS or pattern["kind"] in SCORED_PATTERNS:
        return
    if "negligible" in user:
        raise ValueError(
            f"negligible={compensation['negligible']!r} does not apply to pattern {pattern['kind']!r}; it needs "
            "pattern 'topk' or 'threshold' (it ranks pooled block scores)"
        )
    compensation["negligible"] = 0.0


def _check_vmoba_gate(pattern: dict[str, Any], compensation: dict[str, Any]) -> None:
    """The linear branch sums whole skipped blocks; token-gated VMoBA skips keys inside the blocks it computes."""
    if pattern["kind"] == "vmoba" and pattern.get("vmoba_gate") == "token" and compensation["kind"] == "linear":
        raise ValueError(
            "compensation='linear' does not apply to pattern 'vmoba' with vmoba_gate='token' (the linear branch "
            "covers whole skipped blocks; token gating skips keys inside computed blocks); use vmoba_gate='block' "
            "or compensation 'none' or 'reshape'"
        )


def resolve_config(method: str | None = None, config: AccelConfig | None = None, **options: Any) -> AccelConfig:
    """Merge preset defaults, an optional base config and keyword overrides (flat options or typed parts) into a
    validated config."""
    unknown = sorted(set(options) - set(ALLOWED))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(ALLOWED)}")
    if config is not None and not isinstance(config, AccelConfig):
        raise TypeError(f"config must be an AccelConfig, got {type(config).__name__}")
    if method is None:
        method = config.method if config is not None else DEFAULT_METHOD
    if method not in PRESETS:
        raise ValueError(f"method={method!r} is unknown; available: {', '.join(METHODS)}")
    if config is not None and config.method == method:
        return config.replace(**options)
    values: dict[str, Any] = {}
    if config is not None:  # a base config of another method overrides only the fields it was built with
        values = {name: config.flat(name) for name in config.explicit_fields if name != "method"}
    return AccelConfig(method=method, **_merge(values, options))

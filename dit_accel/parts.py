"""The three typed parts of a method: which key blocks are attended (:class:`PatternConfig`), what stands in for
the skipped ones (:class:`CompensationConfig`) and when a site runs dense or refreshes (:class:`ScheduleConfig`).

Each part validates its own fields and knows which of them apply to which kind. A field that does not apply to
the part's kind must keep its default: another value raises ``ValueError`` naming the field and the kind it needs,
so that no option is accepted and then silently ignored (``tau`` means nothing to a top-k pattern).

The parts are frozen; change one with :func:`dataclasses.replace`, e.g.
``dataclasses.replace(dit_accel.PRESETS["rettention"].pattern, sparsity=0.95)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COMPENSATIONS",
    "CompensationConfig",
    "PATTERNS",
    "PatternConfig",
    "ScheduleConfig",
    "parse_layers",
]

SUPPORTED_BLOCK_SIZES = (64, 128)
PATTERNS = ("topk", "threshold", "window", "inward", "raster", "vmoba")
SCORED_PATTERNS = ("topk", "threshold")  # the patterns that rank pooled block scores
COMPENSATIONS = ("none", "reshape", "linear")


# -- value checks (messages name the parameter, the value and what is allowed) ------------------------------------
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


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer")


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


def _partition_triple(value: Any) -> bool:
    """Whether ``value`` is VMoBA's three partitions: ((a,), (b, c), (d, e, f)) of positive integers."""
    return (
        isinstance(value, tuple)
        and len(value) == 3
        and [len(c) if isinstance(c, tuple) else -1 for c in value] == [1, 2, 3]
        and all(not isinstance(n, bool) and isinstance(n, int) and n >= 1 for c in value for n in c)
    )


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# -- applicability ------------------------------------------------------------------------------------------------
#: field -> (does it apply to these part values?, what it needs). Fields not listed apply to every kind.
Rule = tuple[Callable[[Mapping[str, Any]], bool], str]

PATTERN_RULES: dict[str, Rule] = {
    # tiled and vmoba_select come first: the rules after them read them
    "tiled": (
        lambda v: v["kind"] in SCORED_PATTERNS,
        "pattern 'topk' or 'threshold' ('window', 'inward' and 'vmoba' always reorder, 'raster' never does)",
    ),
    "vmoba_select": (lambda v: v["kind"] == "vmoba", "pattern 'vmoba'"),
    "vmoba_gate": (lambda v: v["kind"] == "vmoba", "pattern 'vmoba'"),
    "vmoba_chunk_size": (lambda v: v["kind"] == "vmoba", "pattern 'vmoba'"),
    "self_block": (lambda v: v["kind"] in SCORED_PATTERNS, "pattern 'topk' or 'threshold'"),
    "keep_rounding": (lambda v: v["kind"] == "topk", "pattern 'topk'"),
    "smooth_k": (
        lambda v: v["kind"] in SCORED_PATTERNS,
        "pattern 'topk' or 'threshold' (the patterns that pool scores)",
    ),
    "tau": (
        lambda v: v["kind"] == "threshold" or (v["kind"] == "vmoba" and v["vmoba_select"] == "threshold"),
        "pattern 'threshold', or pattern 'vmoba' with vmoba_select='threshold'",
    ),
    "threshold_scope": (lambda v: v["kind"] == "threshold", "pattern 'threshold'"),
    "tile": (
        lambda v: v["kind"] in ("window", "inward") or (v["kind"] in SCORED_PATTERNS and v["tiled"]),
        "pattern 'window' or 'inward', or pattern 'topk' or 'threshold' with tiled=True",
    ),
    "window": (lambda v: v["kind"] in ("window", "inward"), "pattern 'window' or 'inward'"),
    "raster_fraction": (lambda v: v["kind"] == "raster", "pattern 'raster'"),
    "vmoba_chunks": (
        lambda v: v["kind"] == "vmoba" and v["vmoba_chunk_size"] is None,
        "pattern 'vmoba' with vmoba_chunk_size=None (give chunk counts or the official chunk sizes, not both)",
    ),
    "vmoba_topk": (
        lambda v: v["kind"] == "vmoba" and v["vmoba_select"] == "topk",
        "pattern 'vmoba' with vmoba_select='topk'",
    ),
    "vmoba_scope": (
        lambda v: v["kind"] == "vmoba" and v["vmoba_gate"] == "token" and v["vmoba_select"] == "threshold",
        "pattern 'vmoba' with vmoba_gate='token' and vmoba_select='threshold'",
    ),
}

_RESHAPE = "compensation 'reshape'"
_RESIDUAL = "compensation 'reshape' (the only part that caches a residual)"
COMPENSATION_RULES: dict[str, Rule] = {
    "ramp": (lambda v: v["kind"] == "reshape", _RESHAPE),
    "rho_clamp": (lambda v: v["kind"] == "reshape", _RESHAPE),
    "residual_update": (lambda v: v["kind"] == "reshape", _RESIDUAL),
    "cache_dtype": (lambda v: v["kind"] == "reshape", _RESIDUAL),
    "cache_offload": (lambda v: v["kind"] == "reshape", _RESIDUAL),
    "cache_budget_mb": (lambda v: v["kind"] == "reshape", _RESIDUAL),
    "feature_map": (lambda v: v["kind"] == "linear", "compensation 'linear'"),
    "linear_weight": (lambda v: v["kind"] == "linear", "compensation 'linear'"),
    "negligible": (lambda v: v["kind"] == "linear", "compensation 'linear' (the branch it trims)"),
}


class _Part:
    """What the three parts share: equality that refuses a bare string, and the applicability checks.

    ``config.pattern`` used to be the kind's name; comparing a part with a string now raises ``TypeError``
    instead of being silently False, so code still written ``config.pattern == "vmoba"`` fails loudly.
    """

    #: the prefix of a kind in messages ("pattern 'topk'"); None for a part without kinds
    KIND_NAME: str | None = None
    RULES: dict[str, Rule] = {}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            raise TypeError(
                f"compared a {type(self).__name__} with the string {other!r}: compare its .kind instead "
                f"(e.g. config.{self.KIND_NAME or 'schedule'}.kind == {other!r})"
            )
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default value."""
        return {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    @classmethod
    def requirement(cls, name: str, values: Mapping[str, Any]) -> str | None:
        """None when field ``name`` applies to a part with these field ``values``; else what it needs."""
        rule = cls.RULES.get(name)
        if rule is None or rule[0](values):
            return None
        return rule[1]

    @classmethod
    def inapplicable_message(cls, name: str, values: Mapping[str, Any]) -> str | None:
        """The error for field ``name`` of ``values`` when it has a value but does not apply; None when fine."""
        need = cls.requirement(name, values)
        if need is None or values[name] == cls.defaults()[name]:
            return None
        return f"{name}={values[name]!r} does not apply to {cls.describe(values, name)}; it needs {need}"

    @classmethod
    def describe(cls, values: Mapping[str, Any], name: str) -> str:
        """The part as a message names it when ``name`` does not apply (its kind, plus what the rule reads)."""
        return f"{cls.KIND_NAME} {values['kind']!r}"

    def _check_applicable(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        for name in self.RULES:
            message = self.inapplicable_message(name, values)
            if message is not None:
                raise ValueError(message)


@dataclass(frozen=True, eq=False)
class PatternConfig(_Part):
    """Which key blocks each query block attends to (every density knob left None follows ``sparsity``).

    Attributes:
        kind: ``topk`` (pooled top-k), ``threshold`` (cumulative pooled softmax mass ``tau``), ``window`` (3D
            window on tiles, clipped at borders), ``inward`` (FreeSwim: 3D window on tiles shifted inward at
            borders), ``raster`` (Re-ttention's 1D band at the same in-frame positions of every frame) or
            ``vmoba`` (1D/2D/3D chunks cycling with the layer index).
        sparsity: fraction of key blocks skipped per query block, in [0, 1). It applies to every kind: it is the
            one knob every preset, sweep and UI sets, and each kind derives its own density from it unless a
            kind-specific knob (``tau``, ``window``, ``raster_fraction``, ``vmoba_topk``) is given.
        block_m: query block size of the kernels (64 or 128).
        block_n: key block size of the kernels (64 or 128).
        smooth_k: ``topk``/``threshold``: subtract the mean key before pooling (SageAttention's smooth-K).
        sink_blocks: number of leading key blocks always attended.
        self_block: ``topk``/``threshold``: always keep each query block's own (diagonal) key block, on top of
            the scored choice (SLA's official selection does not: ``sla-paper`` turns it off).
        keep_rounding: ``topk``: how ``(1 - sparsity) * n_k`` becomes a block count: ``half_up`` or ``floor``
            (SLA's official ``int(topk * K)``); at least one block either way.
        tiled: ``topk``/``threshold``: reorder the video tokens into 3D tiles first, so that each block is a
            compact 3D neighbourhood whose mean represents it (``window``, ``inward`` and ``vmoba`` always
            reorder; ``raster`` never does).
        tau: cumulative mass of ``threshold`` and of ``vmoba`` with ``vmoba_select="threshold"``, in (0, 1].
        threshold_scope: ``threshold``: ``row`` (per query block) or ``head`` (all pairs of a head share one
            budget).
        tile: ``window``/``inward``/tiled ``topk``/``threshold``: 3D tile (frames, rows, cols); None picks one
            whose volume is the smaller block size and that wastes the fewest tokens on the grid.
        window: ``window``/``inward``: extent in tiles (frames, rows, cols); None derives it from ``sparsity``.
        raster_fraction: ``raster``: band width as a fraction of a frame's tokens; None means 1 - sparsity.
        vmoba_chunks: ``vmoba``: how many chunks along each partitioned axis of the latent grid (tokens after
            patchify): (frames,) for 1D, (rows, cols) for 2D (each spatial tile spans all frames), (frames, rows,
            cols) for 3D; layer ``l`` uses partition ``l % 3``. An axis of extent ``e`` split ``c`` ways gets
            exactly ``min(c, e)`` chunks of ``e // c`` or ``e // c + 1`` positions (position ``x`` is in chunk
            ``x * c // e``); where ``c`` divides ``e`` these are VMoBA's own chunks of ``e / c`` (Wan2.1 480p,
            21 x 30 x 52: ((7,), (6, 4), (3, 6, 4)) gives 3 frames, 5 x 13 and 7 x 5 x 13, the paper's).
        vmoba_chunk_size: ``vmoba``: the chunks in VMoBA's own unit instead (its ``process_moba_input``
            ``chunk_size``), latent positions per chunk: (frames,) for 1D, the last chunk taking what is left;
            (rows, cols) for 2D and (frames, rows, cols) for 3D, which must divide the grid (the official code
            asserts it; here a call on a grid they do not divide raises ``ValueError``). None uses
            ``vmoba_chunks``.
        vmoba_select: ``vmoba``: ``topk`` (the own chunk + the highest others, ``vmoba_topk`` in all; the paper's
            training-free "local + top-k") or ``threshold`` (cumulative normalised gate mass ``tau``, the
            official code's default mode, with ``tau=0.25``).
        vmoba_gate: ``vmoba``: what is gated against each chunk's mean key: ``token`` (every query token, as the
            official code: a key block is computed for the tokens that chose its chunk only, see
            :func:`dit_accel.kernels.block_sparse_attention`'s groups) or ``block`` (ours: the mean query of each
            kernel block, and a chosen chunk switches on every key block it overlaps).
        vmoba_topk: ``vmoba`` with ``vmoba_select="topk"``: chunks kept per query token (``token``) or query
            block (``block``), the own chunk included, for the three partitions; None derives them from
            ``sparsity``.
        vmoba_scope: ``vmoba`` with ``vmoba_gate="token"`` and ``vmoba_select="threshold"``: the official
            ``threshold_type``: ``query_head`` (its default: per query token and head, over the chunks) or
            ``head_global`` (the paper's global selection: per head, over all (query, chunk) pairs). (With
            ``vmoba_gate="block"`` the threshold is per head over all (query block, chunk) pairs.)
    """

    kind: str = "topk"
    sparsity: float = 0.75
    block_m: int = 64
    block_n: int = 64
    smooth_k: bool = True
    sink_blocks: int = 0
    self_block: bool = True
    keep_rounding: str = "half_up"
    tiled: bool = False
    tau: float = 0.9
    threshold_scope: str = "row"
    tile: tuple[int, int, int] | None = None
    window: tuple[int, int, int] | None = None
    raster_fraction: float | None = None
    vmoba_chunks: tuple[tuple[int, ...], ...] = ((7,), (6, 4), (3, 6, 4))
    vmoba_chunk_size: tuple[tuple[int, ...], ...] | None = None
    vmoba_select: str = "topk"
    vmoba_gate: str = "block"
    vmoba_topk: tuple[int, int, int] | None = None
    vmoba_scope: str = "query_head"

    KIND_NAME = "pattern"
    RULES = PATTERN_RULES

    def __post_init__(self) -> None:
        for name in ("tile", "window", "vmoba_topk"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        for name in ("vmoba_chunks", "vmoba_chunk_size"):
            chunks = getattr(self, name)
            if isinstance(chunks, (list, tuple)) and all(isinstance(c, (list, tuple)) for c in chunks):
                object.__setattr__(self, name, tuple(tuple(c) for c in chunks))
        self._validate()
        self._check_applicable()

    @classmethod
    def describe(cls, values: Mapping[str, Any], name: str) -> str:
        text = f"pattern {values['kind']!r}"
        if values["kind"] == "vmoba" and name in ("tau", "vmoba_topk"):
            text += f" with vmoba_select={values['vmoba_select']!r}"
        elif values["kind"] == "vmoba" and name == "vmoba_scope":
            text += f" with vmoba_gate={values['vmoba_gate']!r}, vmoba_select={values['vmoba_select']!r}"
        elif values["kind"] == "vmoba" and name == "vmoba_chunks":
            text += f" with vmoba_chunk_size={values['vmoba_chunk_size']!r}"
        elif values["kind"] in SCORED_PATTERNS and name == "tile":
            text += " with tiled=False"
        return text

    def _validate(self) -> None:
        _choice("kind", self.kind, PATTERNS)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise ValueError(f"sparsity={self.sparsity!r} must be a number in [0, 1)")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity={self.sparsity!r} is outside [0, 1)")
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value not in SUPPORTED_BLOCK_SIZES:
                raise ValueError(f"{name}={value!r} is not supported by the kernels; allowed: {SUPPORTED_BLOCK_SIZES}")
        _non_negative_int("sink_blocks", self.sink_blocks)
        _bool("smooth_k", self.smooth_k)
        _bool("self_block", self.self_block)
        _choice("keep_rounding", self.keep_rounding, ("half_up", "floor"))
        _bool("tiled", self.tiled)
        _choice("threshold_scope", self.threshold_scope, ("row", "head"))
        _choice("vmoba_select", self.vmoba_select, ("topk", "threshold"))
        _choice("vmoba_gate", self.vmoba_gate, ("token", "block"))
        _choice("vmoba_scope", self.vmoba_scope, ("query_head", "head_global"))
        _number("tau", self.tau, 0.0, 1.0, "(0, 1]", low_open=True)
        if self.raster_fraction is not None:
            _number("raster_fraction", self.raster_fraction, 0.0, 1.0, "(0, 1] or None", low_open=True)
        for name in ("tile", "window"):
            _positive_triple(name, getattr(self, name))
        if not _partition_triple(self.vmoba_chunks):
            raise ValueError(
                f"vmoba_chunks={self.vmoba_chunks!r} must be three tuples of positive chunk counts: (frames,), "
                "(rows, cols), (frames, rows, cols), e.g. ((7,), (6, 4), (3, 6, 4))"
            )
        if self.vmoba_chunk_size is not None and not _partition_triple(self.vmoba_chunk_size):
            raise ValueError(
                f"vmoba_chunk_size={self.vmoba_chunk_size!r} must be None or three tuples of positive chunk sizes "
                "in latent positions: (frames,), (rows, cols), (frames, rows, cols), e.g. ((3,), (5, 13), (7, 5, 13))"
            )
        if self.vmoba_topk is not None:
            topk = self.vmoba_topk
            if (
                not isinstance(topk, tuple)
                or len(topk) != 3
                or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in topk)
            ):
                raise ValueError(f"vmoba_topk={topk!r} must be None or three positive chunk counts like (2, 6, 18)")


@dataclass(frozen=True, eq=False)
class CompensationConfig(_Part):
    """What stands in for the attention mass of the skipped key blocks.

    ``negligible`` lives here, not in the pattern: it says which non-selected blocks the linear branch leaves
    out (SLA's lowest-scoring k_l), so it changes nothing without that branch. It ranks pooled block scores, so
    it also needs a ``topk`` or ``threshold`` pattern (checked by :class:`~dit_accel.AccelConfig`, which sees
    both parts).

    Attributes:
        kind: ``none``, ``reshape`` (Re-ttention rho and residual, cached at refresh steps) or ``linear`` (SLA
            linear attention over the non-selected blocks).
        ramp: ``reshape``: Re-ttention's lambda added to rho after each sparse step since the refresh, in [0, 1].
        rho_clamp: ``reshape``: clamp the ramped rho at 1 (the paper does not).
        residual_update: ``reshape``: ``none`` (the paper: the refresh's residual R as measured) or ``mean``
            (R shifted by (1 - rho) times the change of the mean value vector since the refresh, so the skipped
            mass follows the values as they evolve instead of adding the refresh step's; see docs/methods.md).
        feature_map: ``linear``: phi of the linear branch: ``softmax`` (over the head dim) or ``elu`` (elu + 1).
        linear_weight: ``linear``: ``proj`` (paper: O_s + proj(O_l), proj zero-initialised, needs fine-tuning) or
            ``mass`` (training-free: alpha O_s + (1 - alpha) O_l + proj(O_l), alpha the kept softmax mass, from
            the last refresh when there is one, else estimated from the block means).
        negligible: ``linear``: fraction of each row's lowest-scoring blocks skipped by both branches, in [0, 1).
        cache_dtype: ``reshape``: dtype of the cached residual: ``auto`` (the input's), ``float32``,
            ``bfloat16``, ``float16``.
        cache_offload: ``reshape``: keep the cached residual on the CPU between steps.
        cache_budget_mb: ``reshape``: refuse (``CacheBudgetError``) when the residual caches of all sites and
            branches would exceed this many MiB; None means no limit.
    """

    kind: str = "none"
    ramp: float = 0.0
    rho_clamp: bool = True
    residual_update: str = "none"
    feature_map: str = "softmax"
    linear_weight: str = "mass"
    negligible: float = 0.0
    cache_dtype: str = "auto"
    cache_offload: bool = False
    cache_budget_mb: float | None = None

    KIND_NAME = "compensation"
    RULES = COMPENSATION_RULES

    def __post_init__(self) -> None:
        self._validate()
        self._check_applicable()

    def _validate(self) -> None:
        _choice("kind", self.kind, COMPENSATIONS)
        _choice("feature_map", self.feature_map, ("softmax", "elu"))
        _choice("linear_weight", self.linear_weight, ("proj", "mass"))
        _choice("residual_update", self.residual_update, ("none", "mean"))
        _choice("cache_dtype", self.cache_dtype, ("auto", "float32", "bfloat16", "float16"))
        _number("negligible", self.negligible, 0.0, 1.0, "[0, 1)", high_open=True)
        _number("ramp", self.ramp, 0.0, 1.0, "[0, 1]")
        if self.cache_budget_mb is not None:
            _number("cache_budget_mb", self.cache_budget_mb, 0.0, float("inf"), "a number >= 0 or None")
        _bool("rho_clamp", self.rho_clamp)
        _bool("cache_offload", self.cache_offload)


@dataclass(frozen=True, eq=False)
class ScheduleConfig(_Part):
    """When a site runs dense, refreshes (full attention, statistics recollected) or rebuilds its pattern.

    Every field applies to every pattern and compensation.

    Attributes:
        dense_steps: steps kept dense at the start; an int count or a float fraction of the steps (1.0 = all; a
            fraction in (0, 1) keeps 1 to ``num_steps - 1`` steps, so few-step runs keep a warm-up and sparse steps).
        dense_layers: attention sites (by layer index) kept dense; a list or a string like ``"0,1,28-29"``.
        min_tokens: sequences shorter than this stay dense (reason ``min_tokens``).
        num_steps: number of denoising steps when no scheduler tells it (bare transformers).
        refresh_every: a full-attention refresh (statistics recollected, pattern rebuilt) every k steps after
            the dense steps; 0 means only when a method has no statistics yet; 1 means every step.
        reuse_pattern_every: rebuild a site's pattern every k steps and reuse it in between (reshape reuses the
            pattern from refresh to refresh, since rho and R belong to it).
        refresh_drift: adaptive refresh: refresh when the mean absolute change of the sparse branch's LSE since
            the last refresh exceeds this many nats; 0 disables it.
    """

    dense_steps: int | float = 0
    dense_layers: tuple[int, ...] = field(default=())
    min_tokens: int = 1024
    num_steps: int | None = None
    refresh_every: int = 0
    reuse_pattern_every: int = 1
    refresh_drift: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_layers", parse_layers(self.dense_layers))
        _non_negative_int("min_tokens", self.min_tokens)
        if self.num_steps is not None:
            _non_negative_int("num_steps", self.num_steps)
        ds = self.dense_steps
        if isinstance(ds, bool) or not isinstance(ds, (int, float)):
            raise ValueError(f"dense_steps={ds!r} must be an int count or a float fraction in [0, 1]")
        if isinstance(ds, float) and not 0.0 <= ds <= 1.0:
            raise ValueError(f"dense_steps={ds!r}: a float is a fraction of the steps and must be in [0, 1]")
        if isinstance(ds, int) and ds < 0:
            raise ValueError(f"dense_steps={ds!r} must not be negative")
        _number("refresh_drift", self.refresh_drift, 0.0, float("inf"), "[0, inf)")
        _non_negative_int("refresh_every", self.refresh_every)
        if isinstance(self.reuse_pattern_every, bool) or not isinstance(self.reuse_pattern_every, int):
            raise ValueError(f"reuse_pattern_every={self.reuse_pattern_every!r} must be an integer >= 1")
        if self.reuse_pattern_every < 1:
            raise ValueError(f"reuse_pattern_every={self.reuse_pattern_every!r} must be >= 1 (1 rebuilds every step)")

    def dense_step_count(self, num_steps: int | None) -> int:
        """How many leading steps stay dense for a generation of ``num_steps`` steps.

        A fraction strictly between 0 and 1 is rounded to the nearest count (Python's ``round``), then kept
        between 1 and ``num_steps - 1``: it asks for a dense warm-up and for sparse steps, and few-step
        schedules (4-8 steps, distilled LoRAs) would otherwise lose one or the other (10 % of 4 steps rounds to
        0). A single-step generation stays dense. An int is a fixed count (it may cover every step).
        """
        if isinstance(self.dense_steps, float):
            if num_steps is None:
                return 0 if self.dense_steps == 0.0 else 1 << 30
            count = int(round(self.dense_steps * num_steps))
            if 0.0 < self.dense_steps < 1.0 and num_steps > 0:
                count = max(1, min(count, num_steps - 1))
            return count
        return int(self.dense_steps)

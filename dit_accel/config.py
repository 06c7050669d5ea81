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
class AccelConfig:
    """Every option of every method. Presets in :data:`PRESETS` fill the defaults per method.

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
    """

    method: str = "blocktopk"
    sparsity: float = 0.75
    block_m: int = 64
    block_n: int = 64
    min_tokens: int = 1024
    dense_steps: int | float = 0
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    num_steps: int | None = None
    smooth_k: bool = True
    sink_blocks: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "dense_layers", parse_layers(self.dense_layers))
        self.validate()

    def validate(self) -> None:
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

    def dense_step_count(self, num_steps: int | None) -> int:
        """How many leading steps stay dense for a generation of ``num_steps`` steps."""
        if isinstance(self.dense_steps, float):
            if num_steps is None:
                return 0 if self.dense_steps == 0.0 else 1 << 30
            return int(round(self.dense_steps * num_steps))
        return int(self.dense_steps)

    def replace(self, **changes: Any) -> AccelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dense_layers"] = list(self.dense_layers)
        return out


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer")


#: Per-method defaults. The seed-method presets are added by :mod:`dit_accel.methods`.
PRESETS: dict[str, dict[str, Any]] = {
    "dense": {"sparsity": 0.0},
    "blocktopk": {"sparsity": 0.75},
}
METHODS: list[str] = list(PRESETS)
DEFAULT_METHOD = "blocktopk"


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
    if config is not None:
        values.update({k: v for k, v in config.to_dict().items() if k != "method"})
    values.update(options)
    return AccelConfig(method=method, **values)

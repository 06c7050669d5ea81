"""``kernel_backend="auto"``: the attention backend chosen per call shape by timing the candidates on real inputs.

The first call for a key (function, device type, dtype, (B, H, N, D, Dv), blocks, density bucket, whether the LSE
is returned, which optional features the call uses) runs the exact reference once, then each candidate once as a
check against it (also its warm-up: Triton's own tuning, FlexAttention's compile); a candidate that raises or
disagrees is excluded for that key, and the exclusion is kept with the reason. The candidates that passed are
timed (``time.perf_counter`` around each call, with ``torch.cuda.synchronize`` before and after on CUDA; the least
disturbed of a few runs counts) and the fastest is cached in a process-level dict for every later call of the key.
The first call returns the winner's own checked output.

Why per density bucket: which backend wins moves with the density (a gathered CPU flash call gets relatively
cheaper at low density than the reference's gather, FlexAttention's block skipping pays off only when sparse). The
density is the LUT's width over the key blocks, a host value (no device read, like the Triton autotuner's key):
exactly the density for the top-k LUTs the methods cut to k columns, an upper bound for the others.

Not timed: a call while ``torch.compile`` traces (the methods' kernels run inside the custom op of
:mod:`dit_accel.kernels.ops`, eagerly, so this only concerns a kernel called straight from compiled code), a call
while a CUDA graph is being captured (a cached choice is used when there is one), and a call that needs gradients.
These take the caller's ``fallback``: the fixed device default (Triton on CUDA, the fused CPU kernels on the CPU).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Choice", "choices", "clear", "counters", "density_bucket", "key_label", "run"]

#: per dtype: atol = rtol of the check against the reference (16-bit kernels keep P in 16 bits; a wrong kernel,
#: one that drops or repeats a block, is off by orders of magnitude more)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
REPEATS = 3  # timed calls per candidate after the check call


@dataclass
class Choice:
    """What the first call of a key decided."""

    backend: str
    seconds: dict[str, float] = field(default_factory=dict)  # per timed candidate, the best of REPEATS calls
    excluded: dict[str, str] = field(default_factory=dict)  # candidate -> why it was left out for this key


_CHOICES: dict[tuple, Choice] = {}
_COUNTERS: Counter = Counter()  # "timed" keys, "timings" (calls timed), "hits", "excluded", "untimed"


def choices() -> dict[tuple, Choice]:
    """A copy of the process-level cache: key -> :class:`Choice`."""
    return dict(_CHOICES)


def counters() -> dict[str, int]:
    """How often keys were timed, calls timed, cache hits, exclusions and untimed calls (for tests and stats)."""
    return dict(_COUNTERS)


def clear() -> None:
    """Forget every choice and counter (tests; a new card in the same process)."""
    _CHOICES.clear()
    _COUNTERS.clear()


def density_bucket(kv_indices: torch.Tensor, n: int, block_n: int, step: float = 0.05) -> float:
    """The LUT's width over the key blocks, rounded to ``step`` (at least one step): a host value, no sync."""
    n_kb = max(1, math.ceil(n / block_n))
    ratio = min(1.0, kv_indices.shape[-1] / n_kb)
    return round(max(step, round(ratio / step) * step), 2)


def key_label(key: tuple) -> str:
    """A readable name of a key, for stats: ``block_sparse_attention cpu float32 1x2x1024x64x64 64x64 d0.25 lse``."""
    name, device, dtype, shape, block_m, block_n, bucket, lse, features = key
    parts = [name, device, dtype.replace("torch.", ""), "x".join(map(str, shape)), f"{block_m}x{block_n}"]
    parts += [f"d{bucket:.2f}", "lse" if lse else "no-lse", *features]
    return " ".join(parts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensors(result: Any) -> tuple[torch.Tensor, ...]:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def disagreement(result: Any, expected: Any, dtype: torch.dtype) -> str | None:
    """Why ``result`` is not ``expected`` within the dtype's tolerance (same -inf rows, no NaN), or None."""
    got, want = _tensors(result), _tensors(expected)
    if len(got) != len(want):
        return f"returned {len(got)} tensors, the reference {len(want)}"
    tol = TOLERANCE.get(dtype, 1e-4)
    for i, (g, w) in enumerate(zip(got, want)):
        if not isinstance(g, torch.Tensor) or g.shape != w.shape:
            return f"output {i}: shape {getattr(g, 'shape', None)} instead of {tuple(w.shape)}"
        try:
            torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol, equal_nan=False)
        except AssertionError as exc:
            first = str(exc).strip().splitlines()
            return f"output {i} differs from the reference: {' '.join(first[:3])}"
    return None


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    best = math.inf
    for _ in range(REPEATS):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
        _COUNTERS["timings"] += 1
    return best


def can_time(device: torch.device, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether this call may be timed: not traced by ``torch.compile``, not captured into a CUDA graph, no
    gradients needed (the candidates have no backward; the reference and the CPU path fall back by themselves)."""
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def run(
    key: tuple,
    device: torch.device,
    dtype: torch.dtype,
    candidates: dict[str, Callable[[], Any]],
    reference: Callable[[], Any],
    fallback: Callable[[], Any],
    *,
    timeable: bool = True,
    time_reference: bool = True,
) -> tuple[Any, str]:
    """``(result, backend)`` of one call under ``auto``.

    ``candidates`` maps backend names to zero-argument calls on this call's inputs; ``reference`` is the exact
    oracle (also a candidate when ``time_reference``: on a GPU it never wins and costs seconds at video sizes, so
    there it only stands in when every candidate failed); ``fallback`` runs when this call may not be timed and the
    key has no choice yet.
    """
    choice = _CHOICES.get(key)
    if choice is not None:
        _COUNTERS["hits"] += 1
        run_it = reference if choice.backend == "reference" else candidates[choice.backend]
        return run_it(), choice.backend
    if not timeable:
        _COUNTERS["untimed"] += 1
        return fallback(), "fallback"
    _COUNTERS["timed"] += 1
    expected = reference()
    choice = Choice(backend="reference")
    outputs: dict[str, Any] = {"reference": expected}
    for name, call in candidates.items():
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run this call is left out, not fatal
            choice.excluded[name] = f"raised {type(exc).__name__}: {exc}"[:300]
            continue
        why = disagreement(result, expected, dtype)
        if why is not None:
            choice.excluded[name] = why[:300]
            continue
        outputs[name] = result
        choice.seconds[name] = _time(call, device)
    if time_reference or not choice.seconds:
        choice.seconds["reference"] = _time(reference, device)
    _COUNTERS["excluded"] += len(choice.excluded)
    choice.backend = min(choice.seconds, key=choice.seconds.__getitem__)
    _CHOICES[key] = choice
    return outputs[choice.backend], choice.backend

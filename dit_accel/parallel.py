"""One generation on several GPUs: dit_accel under diffusers context parallelism.

With ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=n))`` diffusers' native backend
all-to-alls q, k, v under Ulysses and calls ``F.scaled_dot_product_attention`` on ``(B, H / n, S_full, D)``: every
rank sees the whole sequence for its slice of the heads. Our site interceptor catches that call, so the per-head
patterns, rho and residuals are built and cached per rank for its own heads, unchanged. The one decision that mixes
heads, the adaptive refresh (mean LSE drift over all heads), is averaged over the Ulysses group by
:func:`head_sum_count` so every rank refreshes on the same step as a single process would. Ring and unified
attention merge partial results by LSE, which the native backend cannot return, and backends other than
``native`` run their own kernels that we cannot intercept under context parallelism: both are refused by
:func:`check_context_parallel`, at ``accelerate()`` time and again at every forward (parallelism may be enabled
after ``accelerate``).

Many generations split across processes (batch renders, sweeps) live in :mod:`dit_accel.batch`, above the core.
"""

from __future__ import annotations

import weakref
from contextvars import ContextVar
from typing import Any

import torch

__all__ = [
    "SUPPORTED",
    "check_context_parallel",
    "context_parallel_config",
    "describe",
    "enter_forward",
    "head_sum_count",
]

#: What :func:`check_context_parallel` accepts, quoted in its errors.
SUPPORTED = (
    "dit_accel supports diffusers context parallelism in Ulysses mode only "
    "(ContextParallelConfig(ulysses_degree=n), ring_degree 1, ulysses_anything allowed) with the 'native' "
    "attention backend"
)

#: Process group of the Ulysses head split of the forward being run (None: one process holds every head).
_HEAD_GROUP: ContextVar[Any] = ContextVar("dit_accel_head_group", default=None)
#: Transformers whose current parallel config already passed the check (keyed weakly; value: the config's id).
_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, int] = weakref.WeakKeyDictionary()


# -- context parallelism: detection and refusal ---------------------------------------------------------------


def context_parallel_config(transformer: torch.nn.Module) -> Any | None:
    """The ``ContextParallelConfig`` that ``enable_parallelism`` put on ``transformer``, or None.

    Reads ``transformer._parallel_config`` (set by ``ModelMixin.enable_parallelism``; one attribute lookup, as
    this runs at every forward); a module without that attribute (not a ``ModelMixin``) has its attention
    processors' ``_parallel_config`` read instead.
    """
    config = getattr(transformer, "_parallel_config", None)
    if config is None and not hasattr(transformer, "_parallel_config"):
        for module in transformer.modules():
            processor = getattr(module, "processor", None)
            config = getattr(processor, "_parallel_config", None)
            if config is not None:
                break
    if config is None:
        return None
    # ParallelConfig wraps it; a bare ContextParallelConfig (ring_degree attribute) is accepted too.
    return config if hasattr(config, "ring_degree") else getattr(config, "context_parallel_config", None)


def _backends(transformer: torch.nn.Module) -> set[str]:
    """Attention backends the processors of ``transformer`` dispatch to (None resolves to the active one)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    names: set[str] = set()
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            continue
        backend = processor._attention_backend
        if backend is None:
            backend = _AttentionBackendRegistry.get_active_backend()[0]
        names.add(getattr(backend, "value", str(backend)))
    return names


def check_context_parallel(transformer: torch.nn.Module) -> Any | None:
    """Raise ``ValueError`` unless ``transformer`` runs single-process or in a supported Ulysses mode.

    Returns the ``ContextParallelConfig`` (None without context parallelism).
    """
    cp = context_parallel_config(transformer)
    if cp is None:
        return None
    ring = int(getattr(cp, "ring_degree", 1) or 1)
    ulysses = int(getattr(cp, "ulysses_degree", 1) or 1)
    if ring > 1:
        mode = "unified (ring x Ulysses)" if ulysses > 1 else "ring"
        raise ValueError(
            f"{type(transformer).__name__} has context parallelism in {mode} mode (ring_degree={ring}, "
            f"ulysses_degree={ulysses}); {SUPPORTED}. Ring attention merges partial outputs by their LSE over "
            "global key positions, which the native backend cannot return. Use "
            f"ContextParallelConfig(ulysses_degree={ring * ulysses}) (the head count must be divisible by it, "
            "or set ulysses_anything=True), or remove dit_accel (handle.remove()) to run ring attention densely."
        )
    other = sorted(_backends(transformer) - {"native"})
    if other:
        raise ValueError(
            f"{type(transformer).__name__} uses attention backend(s) {', '.join(map(repr, other))} under context "
            f"parallelism; {SUPPORTED}: their context-parallel path calls its own kernel instead of "
            "F.scaled_dot_product_attention, so dit_accel would never see the attention and every call would stay "
            "dense. Call transformer.set_attention_backend('native') before enable_parallelism (dense calls still "
            "reach cuDNN / flash kernels through SDPA's own dispatch)."
        )
    return cp


def _ulysses_group(cp: Any) -> Any | None:
    mesh = getattr(cp, "_ulysses_mesh", None)
    if mesh is None or int(getattr(cp, "ulysses_degree", 1) or 1) <= 1:
        return None
    return mesh.get_group()


def enter_forward(transformer: torch.nn.Module) -> None:
    """Called at the start of every accelerated transformer forward: re-check the parallel config (it may have
    been enabled after ``accelerate``) and publish the Ulysses group for :func:`head_sum_count`.

    Costs one attribute lookup when nothing changed since the last forward.
    """
    cp = context_parallel_config(transformer)
    if cp is None:
        _HEAD_GROUP.set(None)
        return
    if _CHECKED.get(transformer) != id(cp):
        check_context_parallel(transformer)
        _CHECKED[transformer] = id(cp)
    _HEAD_GROUP.set(_ulysses_group(cp))


def head_sum_count(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``stack([total, count])`` summed over every rank's heads under Ulysses (this rank's alone otherwise).

    Used for the decisions that mix heads (adaptive refresh), so that all ranks decide alike and as one process
    holding every head would. Stays on the device (no host sync); every rank of the group must call it the same
    number of times.
    """
    acc = torch.stack([total.double(), count.double()])
    group = _HEAD_GROUP.get()
    if group is None:
        return acc
    import torch.distributed as dist

    device = acc.device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    acc = acc.to(device)
    dist.all_reduce(acc, group=group)
    return acc


def describe(transformer: torch.nn.Module) -> dict[str, Any] | None:
    """What a rank's stats cover under context parallelism (None without it): its rank and the Ulysses degree."""
    cp = context_parallel_config(transformer)
    if cp is None:
        return None
    return {
        "mode": "ulysses",
        "ulysses_degree": int(getattr(cp, "ulysses_degree", 1) or 1),
        "rank": getattr(cp, "_rank", None),
        "world_size": getattr(cp, "_world_size", None),
        "note": "stats count this rank's head slice only",
    }

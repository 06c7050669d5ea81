"""Attention kernels behind one dispatching API.

By default (a kernel called directly) the public functions run the Triton kernels on CUDA when they are available;
on the CPU the fused CPU path in :mod:`dit_accel.kernels.cpu` (PyTorch's CPU flash kernel, exact, falling back to
the reference for what it does not cover); elsewhere the exact PyTorch references in
:mod:`dit_accel.kernels.reference`. Inside an accelerated call the config's ``kernel_backend`` applies: ``"auto"``
(the default) times the candidates of the attention functions once per shape and density bucket and caches the
winner (:mod:`dit_accel.kernels.auto`); a backend name forces it. ``DIT_ACCEL_KERNELS`` forces one process-wide
(below an explicit ``kernel_backend``, see :mod:`dit_accel.kernels.backends`): ``triton``, ``cpu``, ``flex``
(FlexAttention from the LUT, :mod:`dit_accel.kernels.flex`), ``fa4`` (FlashAttention-4's block sparsity,
:mod:`dit_accel.kernels.fa4`), ``flex_flash`` (FlexAttention's FLASH backend), ``cudnn_bsa`` (cuDNN frontend's
block-sparse attention, :mod:`dit_accel.kernels.cudnn_bsa`), ``reference`` or ``auto`` (with
``TRITON_INTERPRET=1`` the Triton kernels run on the CPU, for tests).

The attention functions take an optional ``key_padding`` (bool (B, N), True = attend): SDPA's boolean
key-padding mask, applied inside the kernels (:func:`key_padding_from_mask` reads it from an ``attn_mask``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from . import auto, cpu, reference
from .backends import BACKENDS, KernelPolicy, current_policy, requested, use_backend
from .masks import key_padding_from_mask

__all__ = [
    "BACKENDS",
    "SUPPORTED_BLOCK_SIZES",
    "KernelPolicy",
    "auto_candidates",
    "backend_for",
    "block_sparse_attention",
    "dense_attention",
    "kept_mass",
    "key_blocks_alive",
    "key_padding_from_mask",
    "lut_from_mask",
    "mean_pool",
    "pack_groups",
    "reference",
    "topk_mask",
    "use_backend",
]

SUPPORTED_BLOCK_SIZES = (64, 128)
#: per device type and attention function, the backends ``auto`` times besides the reference (in this order; the
#: reference is timed too on the CPU only: on a GPU it never wins and costs seconds per call at video sizes).
#: FlexAttention's pair on CUDA would take its dense half from the reference, so only Triton competes there.
#: Eager FlexAttention on the CPU evaluates its mask everywhere and was 2.5-20x slower than the fused CPU path
#: in ``scripts/bench_auto.py`` (and slower than the reference), so it is not a CPU candidate
#: (``kernel_backend="flex"`` still forces it). ``fa4`` (FlashAttention-4 from the LUT) and ``flex_flash``
#: (FlexAttention's FLASH backend) compete only where ``flash_attn.cute`` is installed (:func:`_optional_installed`);
#: an installed one that fails to import or disagrees is excluded for the key with the reason; ``cudnn_bsa``
#: (cuDNN frontend's block-sparse attention) likewise where ``cudnn.block_sparse_attention`` is installed.
_CANDIDATES: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {
        "block_sparse_attention": ("triton", "flex", "fa4", "flex_flash", "cudnn_bsa"),
        "block_sparse_attention_pair": ("triton",),
        "sparse_linear_attention": ("triton",),
    },
    "cpu": {
        "block_sparse_attention": ("cpu",),
        "block_sparse_attention_pair": ("cpu",),
    },
}


def _triton_available() -> bool:
    try:
        from . import triton_block_sparse  # noqa: F401
    except Exception:  # pragma: no cover - triton missing or broken on this platform
        return False
    return True


@functools.cache
def _optional_installed(backend: str) -> bool:
    """Whether an optional CUDA backend is worth trying (cached: asked on every ``auto`` call): ``flash_attn.cute``
    is installed (a broken install then raises in the call, and ``auto`` records why); ``flex_flash`` also needs
    torch >= 2.11, ``cudnn_bsa`` needs ``cudnn.block_sparse_attention`` instead."""
    import importlib.util

    module = "cudnn.block_sparse_attention" if backend == "cudnn_bsa" else "flash_attn.cute"
    try:
        found = importlib.util.find_spec(module) is not None
    except Exception:  # noqa: BLE001 - a broken parent package counts as not installed
        found = False
    if backend == "flex_flash":
        from .flex import torch_has_flash_backend

        found = found and torch_has_flash_backend()
    return found


def _check_optional(backend: str) -> None:
    """RuntimeError naming what to install when an explicitly asked-for optional backend cannot run."""
    from . import cudnn_bsa, fa4, flex

    if backend == "cudnn_bsa":
        if not cudnn_bsa.cudnn_bsa_available():
            raise RuntimeError(
                f"kernel_backend='cudnn_bsa' needs CUDA and cuDNN frontend's block-sparse attention (pip install "
                f"'{cudnn_bsa.CUDNN_PACKAGE}'); it is not available here"
            )
        return
    ok = fa4.fa4_available() if backend == "fa4" else flex.flash_backend_available()
    if not ok:
        need = "torch >= 2.11, " if backend == "flex_flash" else ""
        raise RuntimeError(
            f"kernel_backend={backend!r} needs CUDA, {need}and FlashAttention-4 (pip install --pre "
            f"'{fa4.FA4_PACKAGE}'; scripts/stage_fa4.sh installs staged wheels offline); it is not available here"
        )


def backend_for(device: torch.device | str) -> str:
    """Which implementation runs for tensors on ``device`` when nothing is timed: ``"triton"``, ``"cpu"``,
    ``"flex"``, ``"fa4"``, ``"flex_flash"``, ``"cudnn_bsa"`` (these only when forced) or ``"reference"``. Under
    ``auto`` this is the fixed device default: what every untimed function runs, and the attention functions when
    a call cannot be timed (see :mod:`dit_accel.kernels.auto`); the timed choices are in :func:`auto_choices`."""
    forced = requested()
    if forced in ("reference", "flex"):
        return forced
    if forced in ("fa4", "flex_flash", "cudnn_bsa"):
        _check_optional(forced)
        return forced
    if forced == "triton":
        if not _triton_available():
            raise RuntimeError("DIT_ACCEL_KERNELS=triton but the Triton kernels cannot be imported")
        return "triton"
    device = torch.device(device)  # forced is "auto", "default" or "cpu" here
    if device.type == "cpu":
        return "cpu"
    if forced != "cpu" and device.type == "cuda" and _triton_available():
        return "triton"
    return "reference"  # elsewhere, and "cpu" forced for tensors elsewhere: the CPU kernels take CPU tensors only


def _check_block(block_m: int, block_n: int) -> None:
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"{name}={value!r} is not supported; allowed: {SUPPORTED_BLOCK_SIZES}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    return_lse: bool = True,
    return_mass: bool = False,
    key_padding: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    rho: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    rho_add: float = 0.0,
    rho_clamp: bool = False,
):
    """Block-sparse attention over a per-(batch, head, query block) LUT of key blocks.

    Returns ``(out, lse)`` (``lse`` float32 (B, H, N), natural log) or ``out`` alone with ``return_lse=False``;
    ``return_mass`` appends the per-(query block, LUT slot) attention mass (float32 (B, H, n_q, max_blocks)).
    ``key_padding`` (bool (B, N), True = attend) masks keys inside the listed blocks; a row left with no key
    gets 0 and ``lse`` -inf (SDPA's answer for a fully masked row). ``key_groups`` (int32 (N,), -1 = every query
    sees the key) with ``query_groups`` (int64 bit words (B, H, N, ceil(G / 64)), :func:`pack_groups`) keep each
    query token to the keys of its own groups inside the listed blocks (VMoBA's token-level chunk gating).
    ``rho`` (float (B, H, N)) with ``residual`` ((B, H, N, Dv)) returns Re-ttention's reshaped output
    ``min(rho + rho_add, 1 if rho_clamp) * O + residual`` instead of O, fused into the Triton kernel's epilogue.
    See :mod:`dit_accel.kernels.reference` for the layout of ``kv_indices`` and ``kv_counts``.
    """
    _check_block(block_m, block_n)
    return _attention(
        "block_sparse_attention", q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale,
        return_lse=return_lse,
        return_mass=return_mass, key_padding=key_padding, key_groups=key_groups, query_groups=query_groups,
        rho=rho, residual=residual, rho_add=rho_add, rho_clamp=rho_clamp,
    )  # fmt: skip


def block_sparse_attention_pair(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o_sparse, lse_sparse, o_full, lse_full)`` of one call: what a Re-ttention refresh step needs, computed
    in one pass over the key blocks by the Triton kernel; ``key_padding`` masks keys in both, the groups (see
    :func:`block_sparse_attention`) restrict the sparse half."""
    _check_block(block_m, block_n)
    return _attention(
        "block_sparse_attention_pair", q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n,
        scale=scale, key_padding=key_padding,
        key_groups=key_groups, query_groups=query_groups,
    )  # fmt: skip


def sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    negligible: torch.Tensor | None = None,
    feature_map: str = "softmax",
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
    helper_cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLA's fused sparse + linear attention: ``(o_sparse, o_linear, lse)``.

    ``o_sparse``/``lse`` are :func:`block_sparse_attention`'s; ``o_linear`` is linear attention (``feature_map``
    ``"softmax"`` or ``"elu"``) over the key blocks neither selected nor ``negligible``, 0 where none is left;
    keys masked by ``key_padding`` enter neither branch. ``helper_cache``: a dict the caller keeps with its pattern
    (methods pass the pattern's), so the Triton kernel's helper LUTs are built once per pattern, not per call.
    """
    _check_block(block_m, block_n)
    return _attention(
        "sparse_linear_attention", q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n,
        negligible=negligible, feature_map=feature_map, scale=scale, key_padding=key_padding, helper_cache=helper_cache,
    )  # fmt: skip


def kept_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse_sparse: torch.Tensor,
    outside: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Estimated softmax mass (float32 (B, H, N)) the selected blocks hold per row, from the skipped blocks'
    key moments (``outside``: bool (B or 1, H or 1, n_q, n_k)), kept keys only with ``key_padding``; see
    :func:`reference.kept_mass`."""
    _check_block(block_m, block_n)
    return _impl("kept_mass", q.device)(
        q, k, lse_sparse, outside, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding
    )


def mean_pool(
    x: torch.Tensor, block: int, *, smooth: bool = False, key_padding: torch.Tensor | None = None
) -> torch.Tensor:
    """Block means (float32 (B, H, ceil(N/block), D)); ``smooth`` subtracts the mean token first (smooth-K);
    with ``key_padding`` both means cover the kept tokens only (a fully masked block gives 0)."""
    return _impl("mean_pool", x.device)(x, block, smooth=smooth, key_padding=key_padding)


def key_blocks_alive(key_padding: torch.Tensor, block_n: int) -> torch.Tensor:
    """bool (B, ceil(N/block_n)): key blocks with at least one key ``key_padding`` keeps (device op, no sync)."""
    return reference.key_blocks_alive(key_padding, block_n)


def lut_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean block mask (B, H, n_q, n_k) as ``(kv_indices, kv_counts)``, on the device, no host sync."""
    return _impl("lut_from_mask", mask.device)(mask)


def topk_mask(scores: torch.Tensor, k: int, *, forced: torch.Tensor | None = None) -> torch.Tensor:
    """The ``forced`` blocks plus the highest-scoring others, ``k`` per row in all (boolean, like ``scores``)."""
    return _impl("topk_mask", scores.device)(scores, k, forced=forced)


def threshold_mask(scores: torch.Tensor, tau: float, *, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Per row the fewest highest blocks whose softmax mass reaches ``tau``, plus ``forced`` (boolean)."""
    return _impl("threshold_mask", scores.device)(scores, tau, forced=forced)


def pooled_topk_lut(
    q: torch.Tensor,
    k: torch.Tensor,
    block_m: int,
    block_n: int,
    k_blocks: int,
    *,
    forced: torch.Tensor | None = None,
    smooth_k: bool = True,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled-score top-k prediction straight to a LUT ``(kv_indices, kv_counts)`` (SLA / VSA style); with
    ``key_padding`` pooled over kept keys, fully masked key blocks left out."""
    return _impl("pooled_topk_lut", q.device)(
        q, k, block_m, block_n, k_blocks, forced=forced, smooth_k=smooth_k, scale=scale, key_padding=key_padding
    )


def pack_groups(select: torch.Tensor) -> torch.Tensor:
    """bool (..., G) -> the int64 bit words (..., ceil(G / 64)) ``query_groups`` takes (device op, no sync)."""
    return reference.pack_groups(select)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``."""
    return reference.inverse_permutation(perm)


def permute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``out[:, :, i] = x[:, :, perm[i]]`` for (B, H, N, D), e.g. raster order to 3D tiles."""
    return _impl("permute_tokens", x.device)(x, perm)


def unpermute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Undo :func:`permute_tokens` with the same ``perm``."""
    return _impl("unpermute_tokens", x.device)(x, perm)


def auto_candidates(name: str, device: torch.device | str) -> tuple[str, ...]:
    """The backends ``auto`` times for attention function ``name`` on ``device`` besides the reference (those that
    import here)."""
    device = torch.device(device)
    names = _CANDIDATES.get(device.type, {}).get(name, ())

    def usable(b: str) -> bool:
        if b == "triton":
            return _triton_available()
        return _optional_installed(b) if b in ("fa4", "flex_flash", "cudnn_bsa") else True

    return tuple(b for b in names if usable(b))


def auto_choices() -> dict[str, dict[str, Any]]:
    """What ``auto`` chose in this process, by readable key: backend, seconds per timed candidate, exclusions."""
    return {
        auto.key_label(key): {"backend": c.backend, "seconds": dict(c.seconds), "excluded": dict(c.excluded)}
        for key, c in auto.choices().items()
    }


def _features(name: str, kwargs: dict[str, Any]) -> tuple[str, ...]:
    """The options of a call that change which code path runs (so they are timed apart)."""
    flags = {
        "mass": bool(kwargs.get("return_mass")),
        "kpad": kwargs.get("key_padding") is not None,
        "groups": kwargs.get("key_groups") is not None,
        "reshape": kwargs.get("rho") is not None,
        "negligible": kwargs.get("negligible") is not None,
    }
    out = tuple(flag for flag, on in flags.items() if on)
    if name == "sparse_linear_attention":
        out += (str(kwargs.get("feature_map", "softmax")),)
    return out


def _attention(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    **kwargs: Any,
):
    """Attention function ``name`` by the backend asked for; under ``auto`` the timed choice for this call's key."""
    device = q.device
    args = (q, k, v, kv_indices, kv_counts)
    fixed = _impl(name, device)
    candidates = auto_candidates(name, device) if requested() == "auto" else ()
    if not candidates:
        return fixed(*args, **kwargs)
    lse = bool(kwargs.get("return_lse", True)) or name != "block_sparse_attention"
    bucket = auto.density_bucket(kv_indices, q.shape[2], kwargs["block_n"])
    shape = (*q.shape, v.shape[-1])
    key = (
        name, device.type, str(q.dtype), shape, kwargs["block_m"], kwargs["block_n"], bucket, lse,
        _features(name, kwargs),
    )  # fmt: skip
    calls = {b: functools.partial(getattr(_module(b), name), *args, **kwargs) for b in candidates}
    result, chosen = auto.run(
        key, device, q.dtype, calls, functools.partial(getattr(reference, name), *args, **kwargs),
        functools.partial(fixed, *args, **kwargs), timeable=auto.can_time(device, (q, k, v)),
        time_reference=device.type == "cpu",
    )  # fmt: skip
    policy = current_policy()
    if policy is not None:
        policy.used[key] = backend_for(device) if chosen == "fallback" else chosen  # labelled when stats ask
    return result


def _module(backend: str) -> Any:
    """The module implementing ``backend`` (imported on first use: Triton and FlexAttention are heavy)."""
    if backend == "triton":
        from . import triton_block_sparse

        return triton_block_sparse
    if backend == "flex":
        from . import flex

        return flex
    if backend == "fa4":
        from . import fa4

        return fa4
    if backend == "flex_flash":
        from . import flex_flash

        return flex_flash
    if backend == "cudnn_bsa":
        from . import cudnn_bsa

        return cudnn_bsa
    return {"cpu": cpu, "reference": reference}[backend]


def _impl(name: str, device: torch.device):
    """The Triton, fused-CPU or reference function ``name`` for tensors on ``device`` (the CPU module covers the
    attention calls; everything else there is the reference's)."""
    backend = backend_for(device)
    if backend == "triton":
        return getattr(_module("triton"), name)
    return getattr(_module(backend), name, None) or getattr(reference, name)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
):
    """Full attention with its LSE: ``(out, lse)``; used by methods that need statistics of a dense step."""
    impl = cpu.dense_attention if backend_for(q.device) == "cpu" else reference.dense_attention
    return impl(q, k, v, scale=scale, key_padding=key_padding)

"""Exact PyTorch references for every kernel in :mod:`dit_accel.kernels`.

They are the oracle the Triton kernels are tested against and the CPU path. They never build an N x N tensor:
block-sparse attention gathers the selected key blocks for a chunk of query blocks at a time, so its cost
follows the density like the real kernel's.

Conventions (shared with the Triton kernels):

* q, k, v are (B, H, N, D); ``kv_indices`` int32 (B, H, ceil(N / block_m), max_blocks), ascending, valid
  entries first; ``kv_counts`` int32 (B, H, ceil(N / block_m)).
* ``lse`` is float32 (B, H, N) in natural log.
* A query block whose count is 0 attends to nothing: its output is 0 and its ``lse`` is ``-inf``.
* ``key_padding`` (optional, bool (B, N), True = the key takes part) is SDPA's boolean key-padding mask: masked
  keys get no weight anywhere (softmax, linear sums, pooled means, block moments). A row none of whose keys is
  left gets output 0 and ``lse`` ``-inf``, as SDPA returns 0 for a fully masked row of a boolean mask.
* ``key_groups`` / ``query_groups`` (optional, together; block-sparse attention and its pair only) gate keys per
  query *token* inside the listed blocks: ``key_groups`` int32 (N,) is the group of each key (-1: a key every query
  sees), ``query_groups`` int64 (B, H, N, ceil(G / 64)) the groups each query sees, as bit words (bit ``g % 64`` of
  word ``g // 64``; :func:`pack_groups` builds them). VMoBA's token-level chunk gating runs on the block kernels
  this way: the LUT lists every key block some query of the block needs, the bits keep each query to its own
  chunks.
"""

from __future__ import annotations

import math
import sys

import torch

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_pair",
    "block_sizes",
    "dense_attention",
    "inverse_permutation",
    "kept_mass",
    "key_block_moments",
    "key_blocks_alive",
    "kept_counts",
    "lut_from_mask",
    "mean_pool",
    "pack_groups",
    "permute_tokens",
    "pooled_topk_lut",
    "sparse_linear_attention",
    "threshold_mask",
    "topk_mask",
    "unpack_groups",
    "unpermute_tokens",
]

_GATHER_BUDGET = 1 << 24  # elements of gathered keys per chunk (about 64 MB in fp32)


def _check_block_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be (B, H, N, D) with equal shapes; got q={tuple(q.shape)}, k={tuple(k.shape)}, "
            f"v={tuple(v.shape)}"
        )
    b, h, n, _ = q.shape
    n_qb = math.ceil(n / block_m)
    if kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != (b, h, n_qb):
        raise ValueError(
            f"kv_indices must be (B, H, ceil(N/block_m), max_blocks) = ({b}, {h}, {n_qb}, *); "
            f"got {tuple(kv_indices.shape)}"
        )
    if tuple(kv_counts.shape) != (b, h, n_qb):
        raise ValueError(
            f"kv_counts must be (B, H, ceil(N/block_m)) = ({b}, {h}, {n_qb}); got {tuple(kv_counts.shape)}"
        )


def needs_reference(return_mass: bool, key_groups, query_groups, rho, residual) -> bool:
    """Whether a call asks for what only the reference computes in the library backends (flex, fa4, cudnn_bsa):
    kept masses, token-level groups or the reshape epilogue."""
    return return_mass or key_groups is not None or query_groups is not None or rho is not None or residual is not None


def empty_rows_as_reference(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A library kernel's (out, lse) with the reference's convention for a row with no key: output 0 and LSE -inf
    (libraries return NaN or garbage there); lse as float32. Elementwise, no host sync."""
    empty = torch.isneginf(lse) | torch.isnan(lse)
    return out.masked_fill(empty[..., None], 0.0), lse.float().masked_fill(empty, float("-inf"))


def check_key_padding(key_padding: torch.Tensor | None, b: int, n: int, device: torch.device) -> torch.Tensor | None:
    """``key_padding`` validated as bool (B, N) on ``device`` (None stays None); a ValueError names what is wrong."""
    if key_padding is None:
        return None
    if not isinstance(key_padding, torch.Tensor) or key_padding.dtype != torch.bool:
        raise ValueError(f"key_padding must be a bool tensor (B, N) with True = attend; got {key_padding!r:.80}")
    if tuple(key_padding.shape) != (b, n):
        raise ValueError(f"key_padding must be (B, N) = ({b}, {n}); got {tuple(key_padding.shape)}")
    if key_padding.device != torch.device(device):
        raise ValueError(f"key_padding must be on {device}, the device of q; got {key_padding.device}")
    return key_padding


def pack_groups(select: torch.Tensor) -> torch.Tensor:
    """bool (..., G) -> int64 bit words (..., ceil(G / 64)); bit ``g % 64`` of word ``g // 64`` = ``select[..., g]``.

    Eight bits at a time into bytes, then the bytes read as int64 (little-endian byte order), so no tensor wider
    than ``select`` itself is made (VMoBA's (B, H, N, chunks) selections are large)."""
    g = select.shape[-1]
    words = max(1, math.ceil(g / 64))
    bits = torch.nn.functional.pad(select.to(torch.uint8), (0, words * 64 - g))
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
        wide = bits.view(*select.shape[:-1], words, 64).to(torch.int64)
        return (wide << torch.arange(64, device=select.device)).sum(-1)  # distinct powers of two: no carry
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=select.device)
    octets = (bits.view(*select.shape[:-1], words, 8, 8) * weights).sum(-1, dtype=torch.uint8)
    return octets.contiguous().view(torch.int64).squeeze(-1)


def unpack_groups(words: torch.Tensor, n_groups: int) -> torch.Tensor:
    """The inverse of :func:`pack_groups`: bool (..., n_groups)."""
    bits = (words[..., None] >> torch.arange(64, device=words.device)) & 1
    return bits.flatten(-2)[..., :n_groups].bool()


def check_groups(
    key_groups: torch.Tensor | None, query_groups: torch.Tensor | None, b: int, h: int, n: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``key_groups`` int32 (N,) and ``query_groups`` int64 (B, H, N, W) validated (both or neither)."""
    if key_groups is None and query_groups is None:
        return None, None
    if key_groups is None or query_groups is None:
        raise ValueError("key_groups and query_groups go together: give both or neither")
    for name, t, dtype in (("key_groups", key_groups, torch.int32), ("query_groups", query_groups, torch.int64)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype:
            raise ValueError(f"{name} must be an {str(dtype)[6:]} tensor; got {t!r:.80}")
        if t.device != torch.device(device):
            raise ValueError(f"{name} must be on {device}, the device of q; got {t.device}")
    if tuple(key_groups.shape) != (n,):
        raise ValueError(f"key_groups must be (N,) = ({n},); got {tuple(key_groups.shape)}")
    if query_groups.dim() != 4 or tuple(query_groups.shape[:3]) != (b, h, n) or query_groups.shape[3] < 1:
        raise ValueError(f"query_groups must be (B, H, N, words) = ({b}, {h}, {n}, W); got {tuple(query_groups.shape)}")
    return key_groups, query_groups


def _group_allowed(query_words: torch.Tensor, key_group: torch.Tensor) -> torch.Tensor:
    """bool: whether each query (bit words (..., Q, W)) sees each key (groups (..., 1, K), -1 = seen by all)."""
    g = key_group.clamp(min=0)
    words = torch.gather(query_words, -1, (g >> 6).expand(*query_words.shape[:-1], g.shape[-1]))
    return (((words >> (g & 63)) & 1) != 0) | (key_group < 0)


def check_reshape(
    rho: torch.Tensor | None, residual: torch.Tensor | None, b: int, h: int, n: int, dv: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validate the optional reshape epilogue's inputs: both or neither, rho (B, H, N), residual (B, H, N, Dv)."""
    if rho is None and residual is None:
        return None
    if rho is None or residual is None:
        raise ValueError("rho and residual go together (the reshape epilogue needs both); got only one")
    if tuple(rho.shape) != (b, h, n) or tuple(residual.shape) != (b, h, n, dv):
        raise ValueError(
            f"rho must be (B, H, N) = {(b, h, n)} and residual (B, H, N, Dv) = {(b, h, n, dv)}; got "
            f"{tuple(rho.shape)} and {tuple(residual.shape)}"
        )
    if rho.device != device or residual.device != device:
        raise ValueError(f"rho and residual must be on {device}; got {rho.device} and {residual.device}")
    return rho, residual


def apply_reshape(
    out: torch.Tensor, rho: torch.Tensor, residual: torch.Tensor, rho_add: float, rho_clamp: bool
) -> torch.Tensor:
    """``min(rho + rho_add, 1 if clamped) * out + residual`` in float32: the epilogue's exact reference."""
    rho_c = rho.float() + rho_add
    if rho_clamp:
        rho_c = rho_c.clamp(max=1.0)
    return rho_c[..., None] * out.float() + residual.float()


def _padded_keys(key_padding: torch.Tensor | None, n: int, block: int) -> torch.Tensor | None:
    """bool (B, n_blocks, block): key_padding padded with False past N, one row per key block (None stays None)."""
    if key_padding is None:
        return None
    n_blocks = math.ceil(n / block)
    return torch.nn.functional.pad(key_padding, (0, n_blocks * block - n), value=False).view(-1, n_blocks, block)


def key_blocks_alive(key_padding: torch.Tensor, block_n: int) -> torch.Tensor:
    """bool (B, ceil(N/block_n)): key blocks holding at least one key that ``key_padding`` keeps (no host sync)."""
    return _padded_keys(key_padding, key_padding.shape[1], block_n).any(-1)


def kept_counts(key_padding: torch.Tensor, block: int) -> torch.Tensor:
    """float32 (B, ceil(N/block)): keys per block that ``key_padding`` keeps (0 for a fully masked block)."""
    return _padded_keys(key_padding, key_padding.shape[1], block).sum(-1, dtype=torch.float32)


def _safe_exp(scores: torch.Tensor, row_lse: torch.Tensor) -> torch.Tensor:
    """exp(scores - lse) with rows of lse -inf (nothing to attend) giving 0 instead of NaN."""
    finite = torch.isfinite(row_lse)
    probs = torch.exp(scores - torch.where(finite, row_lse, torch.zeros_like(row_lse))[..., None])
    return torch.where(finite[..., None], probs, torch.zeros_like(probs))


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
):
    """Full attention and its natural-log LSE, a chunk of query rows at a time (never N x N at once)."""
    b, h, n, d = q.shape
    key_padding = check_key_padding(key_padding, b, k.shape[2], q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kf, vf = k.float(), v.float()
    rows = max(1, _GATHER_BUDGET // max(1, b * h * k.shape[2]))
    outs, lses = [], []
    for start in range(0, n, rows):
        scores = torch.matmul(q[:, :, start : start + rows].float(), kf.transpose(-1, -2)) * scale
        if key_padding is not None:
            scores = scores.masked_fill(~key_padding[:, None, None, :], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(_safe_exp(scores, row_lse), vf))
        lses.append(row_lse)
    return torch.cat(outs, dim=2).to(q.dtype), torch.cat(lses, dim=2)


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
    """Attention of each query block to its listed key blocks only, exact, in float32 internally.

    With ``rho`` (float (B, H, N)) and ``residual`` ((B, H, N, Dv)) the output is Re-ttention's reshape
    ``min(rho + rho_add, 1 if rho_clamp) * O + residual`` (:func:`apply_reshape`), which the Triton kernel applies in
    its epilogue; ``lse`` and the masses stay those of the plain sparse attention.

    With ``return_mass`` a float32 (B, H, ceil(N/block_m), max_blocks) tensor is appended to the result: for LUT
    slot ``s`` of query block ``i``, the softmax probability its key block receives, averaged over the block's real
    query rows (a non-empty row sums to 1 over its slots; slots past the count are 0). Methods use it to learn
    which blocks carry the mass without an extra dense pass. ``key_groups`` / ``query_groups`` restrict each query
    to the keys of its groups inside the listed blocks (see the module docstring).
    """
    _check_block_inputs(q, k, v, kv_indices, kv_counts, block_m, block_n)
    b, h, n, d = q.shape
    key_padding = check_key_padding(key_padding, b, n, q.device)
    key_groups, query_groups = check_groups(key_groups, query_groups, b, h, n, q.device)
    dv = v.shape[-1]
    if check_reshape(rho, residual, b, h, n, dv, q.device) is not None:
        # the same math on float32 inputs (it runs in float32 anyway) keeps the sparse output unrounded
        result = block_sparse_attention(
            q.float(), k.float(), v.float(), kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale,
            return_lse=True, return_mass=return_mass, key_padding=key_padding, key_groups=key_groups,
            query_groups=query_groups,
        )  # fmt: skip
        out = apply_reshape(result[0], rho, residual, rho_add, rho_clamp).to(q.dtype)
        return _pack(out, result[1], result[-1], return_lse, return_mass)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    n_qb = math.ceil(n / block_m)
    n_kb = math.ceil(n / block_n)
    # Work only on the used part of the LUT (a host sync is fine on this CPU/oracle path): cost follows density.
    width = kv_indices.shape[-1]  # the mass output keeps the caller's LUT width
    max_blocks = min(width, int(kv_counts.max().item()) if kv_counts.numel() else 0)
    kv_indices = kv_indices[..., :max_blocks]

    pad_k = n_kb * block_n - n
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, pad_k)).view(b, h, n_kb, block_n, d)
    vf = torch.nn.functional.pad(v.float(), (0, 0, 0, pad_k)).view(b, h, n_kb, block_n, dv)
    pad_q = n_qb * block_m - n
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, pad_q)).view(b, h, n_qb, block_m, d)
    key_valid = (torch.arange(n_kb * block_n, device=q.device) < n).view(n_kb, block_n)
    keys_kept = _padded_keys(key_padding, n, block_n)  # (B, n_kb, block_n) or None
    if key_groups is not None:
        kgroup = torch.nn.functional.pad(key_groups.long(), (0, pad_k), value=-1).view(n_kb, block_n)
        qwords = torch.nn.functional.pad(query_groups, (0, 0, 0, pad_q)).view(b, h, n_qb, block_m, -1)

    out = torch.zeros(b, h, n_qb, block_m, dv, device=q.device, dtype=torch.float32)
    lse = torch.full((b, h, n_qb, block_m), float("-inf"), device=q.device, dtype=torch.float32)
    mass = torch.zeros(b, h, n_qb, width, device=q.device, dtype=torch.float32)
    query_valid = (torch.arange(n_qb * block_m, device=q.device) < n).view(n_qb, block_m)
    if max_blocks == 0:
        out = out.view(b, h, -1, dv)[:, :, :n].to(q.dtype)
        return _pack(out, lse.view(b, h, -1)[:, :, :n], mass, return_lse, return_mass)

    slot = torch.arange(max_blocks, device=q.device)
    rows_per_chunk = max(1, _GATHER_BUDGET // max(1, b * h * max_blocks * block_n * max(d, dv)))
    for start in range(0, n_qb, rows_per_chunk):
        stop = min(n_qb, start + rows_per_chunk)
        idx = kv_indices[:, :, start:stop].long().clamp(0, n_kb - 1)  # (B, H, R, M)
        used = slot < kv_counts[:, :, start:stop, None]  # (B, H, R, M)
        flat = idx.flatten(2)  # (B, H, R*M)
        kg = torch.gather(kf, 2, flat[..., None, None].expand(-1, -1, -1, block_n, d))
        vg = torch.gather(vf, 2, flat[..., None, None].expand(-1, -1, -1, block_n, dv))
        rows = stop - start
        kg = kg.view(b, h, rows, max_blocks * block_n, d)
        vg = vg.view(b, h, rows, max_blocks * block_n, dv)
        valid = used[..., None] & key_valid[idx]  # (B, H, R, M, block_n)
        if keys_kept is not None:
            valid = valid & keys_kept[torch.arange(b, device=q.device)[:, None, None, None], idx]
        valid = valid.view(b, h, rows, 1, max_blocks * block_n)
        if key_groups is not None:  # each query token keeps the keys of its own groups only
            groups = kgroup[idx].view(b, h, rows, 1, max_blocks * block_n)
            valid = valid & _group_allowed(qwords[:, :, start:stop], groups)
        scores = torch.matmul(qf[:, :, start:stop], kg.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~valid, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # (B, H, R, block_m)
        probs = _safe_exp(scores, row_lse)
        out[:, :, start:stop] = torch.matmul(probs, vg)
        lse[:, :, start:stop] = row_lse
        if return_mass:
            rows_ok = query_valid[start:stop].float()  # (R, block_m)
            per_slot = probs.view(b, h, rows, block_m, max_blocks, block_n).sum(-1)  # (B, H, R, block_m, M)
            mass[:, :, start:stop, :max_blocks] = (per_slot * rows_ok[..., None]).sum(3) / rows_ok.sum(-1)[:, None]

    out = out.view(b, h, n_qb * block_m, dv)[:, :, :n].to(q.dtype)
    lse = lse.view(b, h, n_qb * block_m)[:, :, :n]
    return _pack(out, lse, mass, return_lse, return_mass)


def _pack(out, lse, mass, return_lse: bool, return_mass: bool):
    result = (out,) + ((lse,) if return_lse else ()) + ((mass,) if return_mass else ())
    return result if len(result) > 1 else out


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
    """``(o_sparse, lse_sparse, o_full, lse_full)``: the LUT-restricted and the full attention of one call.

    Re-ttention's refresh steps need both to form rho = exp(lse_sparse - lse_full) and the residual; the Triton
    version computes them in one pass over all key blocks, sharing the selected blocks' work. The groups (see
    :func:`block_sparse_attention`) restrict the sparse half only.
    """
    o_sparse, lse_sparse = block_sparse_attention(
        q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding,
        key_groups=key_groups, query_groups=query_groups,
    )  # fmt: skip
    o_full, lse_full = dense_attention(q, k, v, scale=scale, key_padding=key_padding)
    return o_sparse, lse_sparse, o_full, lse_full


def selected_block_mask(kv_indices: torch.Tensor, kv_counts: torch.Tensor, n_k: int) -> torch.Tensor:
    """The boolean (B, H, n_q, n_k) mask of the blocks a LUT selects (slots past the count ignored)."""
    slot = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    used = (slot < kv_counts[..., None]).to(torch.int32)
    hits = torch.zeros(*kv_indices.shape[:-1], n_k, dtype=torch.int32, device=kv_indices.device)
    hits.scatter_add_(-1, kv_indices.long().clamp(0, n_k - 1), used)
    return hits > 0


def feature_map_fn(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi of linear attention, over the last (head) dimension: ``"softmax"`` or ``"elu"`` (elu + 1), float32."""
    if feature_map == "softmax":
        return torch.softmax(x.float(), dim=-1)
    if feature_map == "elu":
        return torch.nn.functional.elu(x.float()) + 1.0
    raise ValueError(f"feature_map={feature_map!r} is not supported; allowed: 'softmax', 'elu'")


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
    """SLA: ``(o_sparse, o_linear, lse)``; ``o_sparse`` and ``lse`` are exactly :func:`block_sparse_attention`'s.
    (``helper_cache`` is the Triton kernel's: the reference builds no helper LUTs and ignores it.)

    ``o_linear`` is linear attention phi(Q_i) S_i / (phi(Q_i) . Z_i) with S_i = sum_j phi(K_j)^T V_j and
    Z_i = sum_j phi(K_j) over the *marginal* key blocks j of query block i: neither selected in the LUT nor marked
    in ``negligible`` (bool (B, H, ceil(N/block_m), ceil(N/block_n)); None marks none). The tail tokens past N
    never enter the sums, nor do keys ``key_padding`` masks; a fully masked key block is never marginal. A query
    block without a marginal block gets ``o_linear = 0`` (nothing to approximate). Computed directly over the
    marginal blocks here (the kernel subtracts from global sums instead).
    """
    o_sparse, lse = block_sparse_attention(
        q, k, v, kv_indices, kv_counts, block_m=block_m, block_n=block_n, scale=scale, key_padding=key_padding
    )
    b, h, n, d = q.shape
    dv = v.shape[-1]
    n_qb, n_kb = math.ceil(n / block_m), math.ceil(n / block_n)
    marginal = ~selected_block_mask(kv_indices, kv_counts, n_kb)
    if negligible is not None:
        if tuple(negligible.shape) != (b, h, n_qb, n_kb):
            raise ValueError(
                f"negligible must be (B, H, n_q, n_k) = {(b, h, n_qb, n_kb)}; got {tuple(negligible.shape)}"
            )
        marginal &= ~negligible.bool()
    phi_k = feature_map_fn(k, feature_map)
    if key_padding is not None:
        marginal &= key_blocks_alive(key_padding, block_n)[:, None, None, :]
        phi_k = phi_k * key_padding[:, None, :, None]  # masked keys leave S and Z
    pad_k = n_kb * block_n - n
    phi_k = torch.nn.functional.pad(phi_k, (0, 0, 0, pad_k)).view(b, h, n_kb, block_n, d)  # padded rows are 0
    vf = torch.nn.functional.pad(v.float(), (0, 0, 0, pad_k)).view(b, h, n_kb, block_n, dv)
    s_blocks = torch.matmul(phi_k.transpose(-1, -2), vf).flatten(3)  # (B, H, n_kb, D*DV)
    z_blocks = phi_k.sum(3)  # (B, H, n_kb, D)
    s_rows = torch.matmul(marginal.float(), s_blocks).view(b, h, n_qb, d, dv)
    z_rows = torch.matmul(marginal.float(), z_blocks)  # (B, H, n_qb, D)
    pad_q = n_qb * block_m - n
    phi_q = torch.nn.functional.pad(feature_map_fn(q, feature_map), (0, 0, 0, pad_q)).view(b, h, n_qb, block_m, d)
    num = torch.matmul(phi_q, s_rows)  # (B, H, n_qb, block_m, DV)
    den = (phi_q * z_rows[:, :, :, None, :]).sum(-1, keepdim=True)
    has_marginal = marginal.any(-1)[..., None, None]
    o_linear = torch.where(has_marginal, num / torch.where(has_marginal, den, torch.ones_like(den)), 0.0)
    o_linear = o_linear.reshape(b, h, n_qb * block_m, dv)[:, :, :n].to(q.dtype)
    return o_sparse, o_linear, lse


def mean_pool(
    x: torch.Tensor, block: int, *, smooth: bool = False, key_padding: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of each block of ``block`` tokens of (B, H, N, D), float32 (B, H, ceil(N/block), D).

    The ragged last block is averaged over its real tokens. ``smooth`` subtracts the mean over all tokens first
    (SageAttention's smooth-K), which leaves a row-wise top-k unchanged but conditions pooled scores better.
    With ``key_padding`` both means run over the kept tokens only; a fully masked block's mean is 0.
    """
    b, h, n, d = x.shape
    key_padding = check_key_padding(key_padding, b, n, x.device)
    xf = x.float()
    n_blocks = math.ceil(n / block)
    pad = n_blocks * block - n
    if key_padding is not None:
        weight = key_padding[:, None, :, None].float()
        xf = xf * weight
        if smooth:
            total = weight.sum(dim=2, keepdim=True).clamp(min=1.0)
            xf = (xf - xf.sum(dim=2, keepdim=True) / total) * weight
        sums = torch.nn.functional.pad(xf, (0, 0, 0, pad)).view(b, h, n_blocks, block, d).sum(dim=3)
        return sums / kept_counts(key_padding, block).clamp(min=1.0)[:, None, :, None]
    if smooth:
        xf = xf - xf.mean(dim=2, keepdim=True)
    sums = torch.nn.functional.pad(xf, (0, 0, 0, pad)).view(b, h, n_blocks, block, d).sum(dim=3)
    return sums / block_sizes(n, block, x.device)[:, None]


def block_sizes(n: int, block: int, device: torch.device | str) -> torch.Tensor:
    """float32 (ceil(n / block),): real tokens per block (the last one ragged), made on the device (no host copy,
    so capturable in a CUDA graph)."""
    return (n - block * torch.arange(math.ceil(n / block), device=device)).clamp(max=block).to(torch.float32)


def lut_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean block mask (B, H, n_q, n_k) as a LUT: ascending ``kv_indices`` (width n_k) and ``kv_counts``.

    No host synchronisation: the LUT is as wide as the mask; entries past the count are padding.
    """
    n_k = mask.shape[-1]
    cols = torch.arange(n_k, device=mask.device, dtype=torch.int32)
    keyed = torch.where(mask, cols, cols + n_k)  # selected columns first, in ascending order
    order = torch.sort(keyed, dim=-1).values
    kv_indices = torch.where(order < n_k, order, order - n_k).to(torch.int32)
    kv_counts = mask.sum(dim=-1, dtype=torch.int32)
    return kv_indices.contiguous(), kv_counts


def topk_mask(scores: torch.Tensor, k: int, *, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, H, n_q, n_k): the ``forced`` blocks plus the highest-scoring others, ``k`` per row in all.

    Rows keep at least their forced blocks even where those exceed ``k``.
    """
    n_k = scores.shape[-1]
    k = max(0, min(int(k), n_k))
    ranked = scores.float()
    if forced is not None:
        ranked = ranked.masked_fill(forced, float("inf"))
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        mask.scatter_(-1, torch.topk(ranked, k, dim=-1).indices, True)
    if forced is not None:
        mask |= forced
    return mask


def threshold_mask(scores: torch.Tensor, tau: float, *, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, H, n_q, n_k): per row the smallest set of highest-scoring blocks whose softmax mass reaches
    ``tau``, plus the ``forced`` blocks (a cumulative threshold adapts the budget per row and head).

    The softmax runs over all blocks of the row (forced ones included); ties are broken towards the lower index.
    ``tau <= 0`` keeps only the forced blocks, ``tau >= 1`` keeps every block. Rows need one finite score.
    """
    tau = float(tau)
    if tau >= 1.0:
        mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    elif tau <= 0.0:
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    else:
        probs = torch.softmax(scores.float(), dim=-1)
        ranked, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = torch.cumsum(ranked, dim=-1) - ranked
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        mask.scatter_(-1, order, before < tau)
    if forced is not None:
        mask |= forced
    return mask


def pooled_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    block_m: int,
    block_n: int,
    *,
    smooth_k: bool = True,
    scale: float | None = None,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block scores (B, H, ceil(N/block_m), ceil(N/block_n)) float32: mean-pooled Q times mean-pooled K, scaled.

    With ``key_padding`` the key means cover kept keys only and fully masked key blocks score ``-inf``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    pq = mean_pool(q, block_m)
    pk = mean_pool(k, block_n, smooth=smooth_k, key_padding=key_padding)
    scores = torch.matmul(pq, pk.transpose(-1, -2)) * scale
    if key_padding is not None:
        scores = scores.masked_fill(~key_blocks_alive(key_padding, block_n)[:, None, None, :], float("-inf"))
    return scores


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
    """SLA/VSA-style prediction: pooled scores, top ``k_blocks`` per query block (plus ``forced``), as a LUT.

    Returns ``(kv_indices, kv_counts)`` exactly as :func:`lut_from_mask` of :func:`topk_mask` of the pooled scores;
    with ``key_padding`` the fully masked key blocks are left out of the selection (forced ones too, before the
    top-k: they take none of the ``k_blocks``).
    """
    scores = pooled_scores(q, k, block_m, block_n, smooth_k=smooth_k, scale=scale, key_padding=key_padding)
    if key_padding is None:
        return lut_from_mask(topk_mask(scores, k_blocks, forced=forced))
    alive = key_blocks_alive(key_padding, block_n)[:, None, None, :]
    forced = forced & alive if forced is not None else None  # a dead forced block takes no slot of the k
    return lut_from_mask(topk_mask(scores, k_blocks, forced=forced) & alive)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``, on the device of ``perm`` (no host sync)."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def permute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Tokens of (B, H, N, D) reordered: ``out[:, :, i] = x[:, :, perm[i]]`` (e.g. raster order to 3D tiles)."""
    return x.index_select(2, perm.to(device=x.device, dtype=torch.long))


def unpermute_tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Undo :func:`permute_tokens` with the same ``perm``: ``out[:, :, perm[i]] = x[:, :, i]``."""
    return permute_tokens(x, inverse_permutation(perm.to(device=x.device, dtype=torch.long)))


def key_block_moments(
    k: torch.Tensor, block_n: int, key_padding: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per key block: mean and variance of its real tokens (float32 (B, H, n_k, D)) and log of its token count
    (float32 (n_k,), or (B, n_k) with ``key_padding``: kept tokens only, ``-inf`` for a fully masked block whose
    moments are 0); made on the device (no host copy: capturable in a CUDA graph)."""
    b, h, n, d = k.shape
    n_kb = math.ceil(n / block_n)
    kf = k.float()
    if key_padding is not None:
        kf = kf * key_padding[:, None, :, None]
    kf = torch.nn.functional.pad(kf, (0, 0, 0, n_kb * block_n - n)).view(b, h, n_kb, block_n, d)
    if key_padding is None:
        counts = block_sizes(n, block_n, k.device)
        per_block = counts[:, None]
    else:
        counts = kept_counts(key_padding, block_n)  # (B, n_kb)
        per_block = counts.clamp(min=1.0)[:, None, :, None]
    mean = kf.sum(3) / per_block
    var = (kf.pow(2).sum(3) / per_block - mean.pow(2)).clamp(min=0.0)
    return mean, var, counts.log()


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
    """float32 (B, H, N): estimated softmax mass of the selected blocks per row, without a dense pass (SLA's alpha).

    The mass of a skipped key block j for query i is approximated by its moments: n_j exp(s q.mean(K_j)
    + s^2/2 sum_d q_d^2 var(K_j)_d) (a log-normal per block, exact to second order), summed over the skipped
    blocks of the row's query block (``outside``: bool (B or 1, H or 1, n_q, n_k)); the kept mass is
    exp(lse_sparse) over itself plus that sum. Cost O(N n_k D), like pooled scoring with unpooled queries.
    With ``key_padding`` the moments cover kept keys only; a row whose skipped blocks hold no kept key keeps all
    its mass (1, also where ``lse_sparse`` is ``-inf``).
    """
    b, h, n, d = q.shape
    key_padding = check_key_padding(key_padding, b, n, q.device)
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mean, var, log_count = key_block_moments(k, block_n, key_padding)
    if key_padding is not None:
        log_count = log_count[:, None, None, None, :]  # (B, 1, 1, 1, n_kb) against (B, H, R, bm, n_kb)
    n_kb = mean.shape[2]
    n_qb = math.ceil(n / block_m)
    qpad = torch.nn.functional.pad(q.float(), (0, 0, 0, n_qb * block_m - n)).view(b, h, n_qb, block_m, d)
    outside = outside.expand(b, h, n_qb, n_kb)
    log_out = torch.empty(b, h, n_qb, block_m, device=q.device)
    rows = max(1, (1 << 26) // max(1, b * h * block_m * n_kb))  # about 256 MB of fp32 logits per chunk
    for start in range(0, n_qb, rows):
        qs = qpad[:, :, start : start + rows]  # (B, H, R, bm, D)
        logits = s * torch.einsum("bhrmd,bhkd->bhrmk", qs, mean)
        logits = logits + 0.5 * s * s * torch.einsum("bhrmd,bhkd->bhrmk", qs.pow(2), var) + log_count
        logits = logits.masked_fill(~outside[:, :, start : start + rows, None, :], float("-inf"))
        log_out[:, :, start : start + rows] = torch.logsumexp(logits, dim=-1)
    log_out = log_out.view(b, h, n_qb * block_m)[:, :, :n]
    return torch.where(torch.isneginf(log_out), 1.0, torch.sigmoid(lse_sparse.float() - log_out))

"""VMoBA: key chunks partitioned 1D / 2D / 3D cycling with the layer, gated by q . mean(K chunk).

Two gates (``vmoba_gate``):

* ``token``, as the official code (KwaiVGI/VMoBA at 4da72ff, ``src/vmoba.py``, function ``moba_attn_varlen``):
  every query token is gated against every chunk's mean key, and selects its chunks itself. The block kernels
  compute it exactly: the LUT of a query block lists every key block a chunk chosen by one of its tokens touches,
  and the kernel keeps each token to the keys of its own chunks (``key_groups`` / ``query_groups``, see
  :func:`dit_accel.kernels.block_sparse_attention`). Selection rules (:func:`token_topk`,
  :func:`token_threshold`) and the dense fallback follow that file; docs/methods.md states them with line
  numbers, and tests/methods/test_paper_vmoba.py re-implements them independently.
* ``block`` (ours): the gate is taken per query *block* (the mean of its queries' gates, i.e. the pooled query
  times the chunk's mean key) and a selected chunk switches on every key block it overlaps
  (:func:`vmoba_topk`, :func:`vmoba_threshold`).
"""

from __future__ import annotations

import math

import torch

from ..layout import TokenLayout, inverse_permutation
from .geometry import GroupGeometry
from .scored import keep_count

__all__ = [
    "chunk_means",
    "partition_of",
    "token_topk",
    "token_threshold",
    "vmoba_axis_chunks",
    "vmoba_geometry",
    "vmoba_keep",
    "vmoba_threshold",
    "vmoba_topk",
]

_EPS = 1e-6  # the official code's eps (src/vmoba.py, the threshold helpers)
_AXES = ("frames", "rows", "cols")


def partition_of(site_index: int) -> int:
    """0 (1D temporal), 1 (2D spatial over all frames) or 2 (3D cubes): VMoBA cycles with ``layer % 3``."""
    return site_index % 3


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def vmoba_axis_chunks(
    grid: tuple[int, int, int],
    partition: int,
    counts: tuple[int, ...],
    sizes: tuple[int, ...] | None = None,
) -> list[torch.Tensor]:
    """The chunk index of every position along (frames, rows, cols) for ``partition``.

    ``sizes`` (VMoBA's ``chunk_size``, latent positions per chunk) when given, else ``counts`` (chunks per axis,
    split as evenly as the extent allows: position ``x`` of an axis of extent ``e`` split ``c`` ways is in chunk
    ``x * c // e``). Axes the partition does not split are one chunk: rows and cols in 1D, frames in 2D.
    """
    return _axis_chunks(grid, partition, counts, sizes)[0]


def _axis_chunks(grid, partition, counts, sizes) -> tuple[list[torch.Tensor], tuple[int, int, int]]:
    """:func:`vmoba_axis_chunks` and the number of chunks along each axis (host ints, no tensor read)."""
    split = {0: (0,), 1: (1, 2), 2: (0, 1, 2)}[partition]
    out = [torch.zeros(e, dtype=torch.long) for e in grid]
    n_chunks = [1, 1, 1]
    for i, axis in enumerate(split):
        extent = grid[axis]
        pos = torch.arange(extent)
        if sizes is None:
            c = max(1, min(int(counts[i]), extent))
            out[axis] = pos * c // extent
            n_chunks[axis] = c
            continue
        size = int(sizes[i])
        if partition > 0 and extent % size:  # process_moba_input asserts it for 2D and 3D chunks
            named = ", ".join(f"{_AXES[a]} {grid[a]}" for a in split)
            allowed = "; ".join(f"{_AXES[a]}: {_divisors(grid[a])}" for a in split)
            raise ValueError(
                f"vmoba_chunk_size[{partition}]={tuple(sizes)!r} does not divide the latent grid ({named}): VMoBA's "
                f"{partition + 1}D chunks must divide it (its process_moba_input asserts this); sizes that divide: "
                f"{allowed}; or give chunk counts (vmoba_chunks) instead"
            )
        out[axis] = pos // size  # 1D: the last chunk takes the frames that are left (the official calc_chunks)
        n_chunks[axis] = -(-extent // size)
    return out, tuple(n_chunks)  # type: ignore[return-value]


def vmoba_geometry(
    layout: TokenLayout,
    partition: int,
    counts: tuple[int, ...],
    sizes: tuple[int, ...] | None = None,
    device: torch.device | str = "cpu",
) -> GroupGeometry:
    """Video tokens reordered chunk by chunk (text tokens stay where they are), as ``process_moba_input`` orders
    them: chunks frame-chunk-major, then row, then column; tokens inside a chunk in raster order."""
    f, h, w = layout.grid
    (fi, hi, wi), nt = _axis_chunks(layout.grid, partition, counts, sizes)
    chunk = ((fi.view(f, 1, 1) * nt[1] + hi.view(1, h, 1)) * nt[2] + wi.view(1, 1, w)).flatten()
    video_perm = torch.sort(chunk, stable=True).indices
    start, n = layout.video_start, layout.total_tokens
    perm = torch.arange(n)
    perm[start : start + layout.video_tokens] = video_perm + start
    group_of = torch.full((n,), -1, dtype=torch.long)
    group_of[start : start + layout.video_tokens] = chunk[video_perm]
    coords = torch.stack(torch.meshgrid(*(torch.arange(t) for t in nt), indexing="ij"), -1).view(-1, 3)
    n_groups = math.prod(nt)
    group_of, coords = group_of.to(device), coords.to(device)
    if nt[1] == nt[2] == 1:  # chunks of whole frames: already contiguous (decided without reading a tensor)
        return GroupGeometry(None, None, group_of, n_groups, coords, nt)  # type: ignore[arg-type]
    perm = perm.to(device)
    return GroupGeometry(perm, inverse_permutation(perm), group_of, n_groups, coords, nt)  # type: ignore[arg-type]


def vmoba_keep(topk: tuple[int, int, int] | None, sparsity: float, partition: int, n_chunks: int) -> int:
    """Chunks kept per query (own chunk included) by ``vmoba_select="topk"``: ``vmoba_topk`` of the partition
    (at most the chunk count, as the official ``min(moba_topk, num_chunk)``) or ``(1 - sparsity)`` of them."""
    keep = topk[partition] if topk is not None else keep_count(sparsity, n_chunks)
    return max(1, min(int(keep), n_chunks))


def chunk_means(
    k: torch.Tensor,
    group_of: torch.Tensor,
    n_chunks: int,
    key_padding: torch.Tensor | None = None,
    *,
    with_counts: bool = False,
):
    """(B, H, n_chunks, D): the mean key of each chunk (``group_of`` labels kernel-order positions, -1 = none), in
    float32 (float64 for float64 keys); with ``key_padding`` (bool (B, N) in kernel order) over the kept keys
    only (0 for a chunk with none). ``with_counts`` also returns the kept keys per chunk (float (B or 1, n))."""
    b, h, n, d = k.shape
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    valid = group_of >= 0
    idx = group_of[valid]
    kv = k[:, :, valid].to(dtype)
    sums = torch.zeros(b, h, n_chunks, d, device=k.device, dtype=dtype)
    if key_padding is None:
        sums.index_add_(2, idx, kv)
        counts = torch.bincount(idx, minlength=n_chunks).to(dtype)[None]
        means = sums / counts.clamp(min=1)[:, None, :, None]
    else:
        weight = key_padding[:, valid].to(dtype)  # (B, N_video)
        sums.index_add_(2, idx, kv * weight[:, None, :, None])
        counts = torch.zeros(b, n_chunks, device=k.device, dtype=dtype).index_add_(1, idx, weight)
        means = sums / counts.clamp(min=1.0)[:, None, :, None]
    return (means, counts) if with_counts else means


# -- token gate: the official selection ---------------------------------------------------------------------------
def token_topk(gate: torch.Tensor, own: torch.Tensor, valid: torch.Tensor, keep: int) -> torch.Tensor:
    """Local + top-k per query token and head (``select_mode="topk"``, ``threshold_type="query_head"``): the own
    chunk ranks first (the official code adds 1e9 to its gate), then the highest gates, ``keep`` chunks in all;
    chunks that are not ``valid`` are never chosen. ``gate`` (B, H, S, C); ``own`` bool (S, C); ``valid`` bool
    (B or 1, C). Ties between equal gates go to the lower chunk index."""
    ranked = gate.masked_fill(~valid[:, None, None, :], float("-inf")).masked_fill(own, float("inf"))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., : max(1, keep)]
    chosen = torch.zeros(gate.shape, dtype=torch.bool, device=gate.device).scatter_(-1, order, True)
    return (chosen & valid[:, None, None, :]) | own


def token_threshold(
    gate: torch.Tensor, own: torch.Tensor, valid: torch.Tensor, tau: float, scope: str = "query_head"
) -> torch.Tensor:
    """Cumulative-threshold selection (``select_mode="threshold"``) with the official recipe, per query token and
    head over the chunks (``scope="query_head"``, the official default) or per head over all (query, chunk) pairs
    (``"head_global"``):

    1. min-max normalise the gates of the scope over its valid entries (a spread of at most 1e-6 divides by 1);
    2. the own chunks' share of the scope's normalised sum counts first: ``remain = max(0, tau - own / (sum +
       1e-6))``;
    3. the other entries in descending order (the own ones as 0), the smallest prefix whose cumulative sum over
       ``(sum + 1e-6)`` reaches ``remain`` is chosen, always at least its first entry; if no prefix does, all;
    4. plus the own chunks, valid entries only.

    Ties (equal normalised values, e.g. the own chunk and the row minimum, both 0) are ordered by index: chunk for
    ``query_head``, chunk-major then query for ``head_global`` (the official flattening); the official code sorts
    with ``torch.sort`` without ``stable=True``, whose tie order is the same on CPU and unspecified elsewhere.
    """
    b, h, s, c = gate.shape
    valid4 = valid[:, None, None, :].expand(b, h, s, c)
    own4 = own.expand(b, h, s, c)
    if scope == "query_head":
        g, v, o = gate, valid4, own4
    elif scope == "head_global":  # one scope per head: flatten (chunk, query) chunk-major, as the official code
        g, v, o = (x.transpose(-1, -2).reshape(b, h, 1, c * s) for x in (gate, valid4, own4))
    else:
        raise ValueError(f"scope={scope!r} is not allowed; choose 'query_head' or 'head_global'")
    lo = g.masked_fill(~v, float("inf")).amin(-1, keepdim=True)
    hi = g.masked_fill(~v, float("-inf")).amax(-1, keepdim=True)
    denom = hi - lo
    denom = torch.where(denom <= _EPS, torch.ones_like(denom), denom)
    norm = torch.where(v, (g - lo) / denom, torch.zeros_like(g))
    total = norm.sum(-1, keepdim=True)
    remain = (tau - (norm * o).sum(-1, keepdim=True) / (total + _EPS)).clamp(min=0.0)
    others = torch.where(v & ~o, norm, torch.zeros_like(norm))
    ranked, order = torch.sort(others, dim=-1, descending=True, stable=True)
    reached = torch.cumsum(ranked, dim=-1) / (total + _EPS) >= remain
    width = ranked.shape[-1]
    first = torch.where(reached.any(-1, keepdim=True), reached.float().argmax(-1, keepdim=True), width - 1)
    take = torch.arange(width, device=gate.device) <= first
    chosen = torch.zeros_like(take).scatter_(-1, order, take)
    chosen = v & (chosen | o)
    if scope == "head_global":
        chosen = chosen.view(b, h, c, s).transpose(-1, -2)
    return chosen


# -- block gate: ours ---------------------------------------------------------------------------------------------
def vmoba_topk(gate: torch.Tensor, self_chunks: torch.Tensor, k: int) -> torch.Tensor:
    """Local + top-k (the training-free mode): the self chunks rank first, ``k`` chunks per row in all."""
    n_c = gate.shape[-1]
    k = max(1, min(int(k), n_c))
    ranked = gate.float().masked_fill(self_chunks, float("inf"))
    mask = torch.zeros(gate.shape, dtype=torch.bool, device=gate.device)
    mask.scatter_(-1, torch.topk(ranked, k, dim=-1).indices, True)
    return mask | self_chunks


def vmoba_threshold(gate: torch.Tensor, self_chunks: torch.Tensor, tau: float) -> torch.Tensor:
    """Global per-head selection (like VMoBA's ``head_global``): min-max normalise the head's gates over all
    (query, chunk) pairs, count the self pairs first, then add the highest other pairs in descending order
    until the cumulative normalised sum reaches ``tau`` of the head's total (the smallest such prefix)."""
    b, h, n_q, n_c = gate.shape
    g = gate.float().reshape(b, h, -1)
    lo = g.amin(-1, keepdim=True)
    hi = g.amax(-1, keepdim=True)
    norm = (g - lo) / torch.clamp(hi - lo, min=torch.finfo(torch.float32).tiny)
    selfs = self_chunks.expand(b, h, n_q, n_c).reshape(b, h, -1)
    total = norm.sum(-1, keepdim=True)
    remain = tau * total - (norm * selfs).sum(-1, keepdim=True)
    others = norm.masked_fill(selfs, -1.0)  # self pairs sort last and are never counted again
    ranked, order = torch.sort(others, dim=-1, descending=True, stable=True)
    ranked = ranked.clamp(min=0.0)
    before = torch.cumsum(ranked, dim=-1) - ranked
    take = (before < remain) & (torch.gather(selfs, -1, order) == 0)
    mask = torch.zeros_like(selfs)
    mask.scatter_(-1, order, take)
    return mask.view(b, h, n_q, n_c) | self_chunks

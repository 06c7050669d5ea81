"""``vmoba-paper`` selects exactly what VMoBA's official code selects, and computes what it computes.

The official rule, re-implemented here from its description (KwaiVGI/VMoBA, commit 4da72ff, ``src/vmoba.py``):

* Partition (``process_moba_input``, lines 730-763): a chunk size given as an int is 1D, ``chunk_size`` whole
  frames, i.e. ``chunk_size * h * w`` consecutive tokens (line 747), no reordering; a pair (rows, cols) is 2D, a
  spatial tile over all frames, tokens reordered tile-major (line 753); a triple (frames, rows, cols) is 3D, cubes
  reordered cube-major (line 758); 2D and 3D sizes must divide the grid (asserts, lines 751 and 756). In the
  reordered sequence the chunks are consecutive runs of the chunk size, the last one shorter when the size does
  not divide the length (``calc_chunks``, lines 12-48: a ceil count, line 21, and the last chunk's size, 33-34).
* Gate (``moba_attn_varlen``, lines 579-589): per head, the mean of each chunk's keys in float32, times each query
  token: no scale, no softmax.
* Own chunk (lines 592-601): the query's own chunk is always attended; in top-k mode its gate gets +1e9 first.
* ``topk`` mode with ``query_head`` (lines 611-620): per (head, query token) the ``min(moba_topk, chunks)``
  (line 564) highest gates, the own chunk among them.
* ``threshold`` mode (lines 649-661), the default (``select_mode='threshold'``, ``simsum_threshold=0.25``,
  ``threshold_type='query_head'``, lines 537-539). ``query_head`` (lines 53-114): per (head, query token),
  min-max normalise the gates over the chunks (a spread of at most 1e-6 divides by 1), ``remain = max(0, tau -
  own / (sum + 1e-6))``, sort the other chunks' normalised gates in descending order (the own one as 0), take the
  shortest prefix whose cumulative sum over (sum + 1e-6) reaches ``remain``, at least one entry, all when none
  does, plus the own chunk. ``head_global`` (lines 268-336): the same per head over every (chunk, query) pair,
  flattened chunk-major.
* Dense fallback (lines 665-671): the own chunks leave the selected set; if nothing is left for any query of the
  call, plain dense attention instead.
* Output (``MixedAttention.forward``, lines 339-442): the own-chunk attention and one attention per selected
  (chunk, head) merged through their LSEs, i.e. softmax attention with scale 1/sqrt(d) (line 357), non-causal,
  over the keys of the own and the selected chunks.

Ties between equal normalised gates are resolved by index here, which is what ``torch.sort`` does on CPU (the
official code does not ask for a stable sort); they decide a selection when exactly two chunks exist. Video only:
the official code knows no text tokens and no key padding (ours: text rows see everything, text keys are seen by
everything, padded chunks are never chosen).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _method_helpers import brute_attention, make_call

from dit_accel import kernels
from dit_accel.config import resolve_config
from dit_accel.core import SiteGroup
from dit_accel.layout import TokenLayout
from dit_accel.methods import build_method
from dit_accel.state import DenoiseState


# -- the official rule, re-implemented -----------------------------------------------------------------------------
def official_partition(grid: tuple[int, int, int], size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chunk, order)``: the official chunk of each native (frame-major raster) token, and the order of the
    reordered sequence (``order[p]`` = native token at position ``p``), chunk-major with raster order inside."""
    t, h, w = grid
    n = t * h * w
    idx = torch.arange(n)
    frame, row, col = idx // (h * w), idx // w % h, idx % w
    if len(size) == 1:  # whole frames, consecutive tokens, the last chunk ragged
        chunk = idx // (size[0] * h * w)
    elif len(size) == 2:
        assert h % size[0] == 0 and w % size[1] == 0
        chunk = (row // size[0]) * (w // size[1]) + col // size[1]
    else:
        assert t % size[0] == 0 and h % size[1] == 0 and w % size[2] == 0
        chunk = ((frame // size[0]) * (h // size[1]) + row // size[1]) * (w // size[2]) + col // size[2]
    order = torch.tensor(sorted(range(n), key=lambda i: (int(chunk[i]), i)))
    return chunk, order


def _prefix_threshold(norm: torch.Tensor, own: torch.Tensor, tau: float) -> torch.Tensor:
    """The threshold recipe along the last dim of ``norm`` (normalised gates, 0 where invalid); ``own`` the own
    entries. Returns the chosen entries, own included."""
    eps = 1e-6
    total = norm.sum(-1, keepdim=True)
    remain = torch.clamp(tau - (norm * own).sum(-1, keepdim=True) / (total + eps), min=0.0)
    others = norm.masked_fill(own, 0.0)
    values, order = torch.sort(others, dim=-1, descending=True, stable=True)
    ok = values.cumsum(-1) / (total + eps) >= remain
    cut = torch.where(ok.any(-1, keepdim=True), ok.float().argmax(-1, keepdim=True), values.shape[-1] - 1)
    in_sorted = torch.arange(values.shape[-1]) <= cut
    chosen = torch.zeros_like(in_sorted).scatter(-1, order, in_sorted)
    return chosen | own


def _min_max(gate: torch.Tensor, dims) -> torch.Tensor:
    lo, hi = gate.amin(dims, keepdim=True), gate.amax(dims, keepdim=True)
    spread = hi - lo
    return (gate - lo) / torch.where(spread <= 1e-6, torch.ones_like(spread), spread)


def official_selection(q, k, chunk, order, mode: str, topk: int = 3, tau: float = 0.25, scope: str = "query_head"):
    """bool (H, N, C) per native query token: the chunks it attends (own included), for one sample
    (``q``, ``k``: (H, N, D) native order); and whether the official code falls back to dense."""
    qs, ks, cs = q[:, order], k[:, order], chunk[order]  # the reordered sequence
    n_c = int(chunk.max()) + 1
    # float64 here (ours too for float64 inputs; the official code works in float32): no near-tie can flip
    means = torch.stack([ks[:, cs == c].double().mean(1) for c in range(n_c)])  # (C, H, D)
    gate = torch.einsum("chd,hsd->chs", means, qs.double())  # (C, H, S)
    own = (cs[None, None, :] == torch.arange(n_c)[:, None, None]).expand_as(gate)  # (C, H, S)
    if mode == "topk":
        bumped = gate + 1e9 * own
        keep = min(topk, n_c)
        top = torch.sort(bumped, dim=0, descending=True, stable=True).indices[:keep]
        chosen = torch.zeros_like(own).scatter(0, top, True)
    elif scope == "query_head":
        norm = _min_max(gate, 0)  # per (head, query) over the chunks
        chosen = _prefix_threshold(norm.permute(1, 2, 0), own.permute(1, 2, 0), tau).permute(2, 0, 1)
    else:  # head_global: per head over (chunk, query), chunk-major
        norm = _min_max(gate, (0, 2))
        c, h, s = gate.shape
        flat = lambda x: x.permute(1, 0, 2).reshape(h, c * s)  # noqa: E731
        chosen = _prefix_threshold(flat(norm), flat(own), tau).reshape(h, c, s).permute(1, 0, 2)
    dense = not bool((chosen & ~own).any())
    native = torch.empty_like(chosen)
    native[:, :, order] = chosen  # back to native token order
    return native.permute(1, 2, 0), dense  # (H, N, C)


def official_output(q, k, v, chunk, selection, dense):
    """Softmax attention over the own and selected chunks' keys (or all keys on the dense fallback), float64."""
    allowed = selection[:, :, chunk] | dense  # (H, N_q, N_k)
    return brute_attention(q, k, v, allowed)[0]


# -- ours ------------------------------------------------------------------------------------------------------
def ours_token_mask(method, call) -> torch.Tensor:
    """bool (B, H, N, N) native order: the keys each query token attends in our cached pattern (the LUT's blocks
    restricted by the per-token chunk bits), checked against the LUT's block cover on the way."""
    pattern, plan = call.cache.pattern, method.plan(call)
    cfg = call.config
    n = call.q.shape[2]
    n_k = math.ceil(n / cfg.block_n)
    blocks = kernels.reference.selected_block_mask(pattern.kv_indices, pattern.kv_counts, n_k)
    pos = torch.arange(n)
    in_lut = blocks[..., pos // cfg.block_m, :][..., pos // cfg.block_n]  # kernel order
    select = kernels.reference.unpack_groups(pattern.query_groups, plan.groups.n_groups)  # (B, H, N, C)
    kg = pattern.key_groups.long()
    seen = select[..., kg.clamp(min=0)] | (kg < 0)  # (B, H, N_q, N_k) kernel order
    assert bool((in_lut | ~seen).all()), "a chosen key lies outside the LUT's blocks"
    tok = seen & in_lut
    if plan.inv is not None:
        tok = tok[..., plan.inv, :][..., plan.inv]
    return tok


def _structured(grid, b, h, d, rng):
    """Spatially local q and k: smooth random features of the (frame, row, col) position (low frequencies), so
    that a query's best chunks are near it; plus noise and a random v."""
    t, hh, w = grid
    n = t * hh * w
    idx = torch.arange(n)
    pos = torch.stack([idx // (hh * w), idx // w % hh, idx % w], -1).double()
    freq = torch.randn(h, 3, d, generator=rng, dtype=torch.float64) * 0.4
    phase = torch.rand(h, 1, d, generator=rng, dtype=torch.float64) * 2 * math.pi
    feat = torch.cos(pos[None] @ freq + phase)  # (H, N, D)
    q = 3 * feat[None] + 0.2 * torch.randn(b, h, n, d, generator=rng, dtype=torch.float64)
    k = 3 * feat[None] + 0.2 * torch.randn(b, h, n, d, generator=rng, dtype=torch.float64)
    v = torch.randn(b, h, n, d, generator=rng, dtype=torch.float64)
    return q, k, v


def _inputs(kind, grid, rng, b=2, h=2, d=16):
    if kind == "structured":
        return _structured(grid, b, h, d, rng)
    n = math.prod(grid)
    q, k, v = (torch.randn(b, h, n, d, generator=rng, dtype=torch.float64) for _ in range(3))
    return 2 * q, k, v


GRID = (5, 6, 8)  # 240 tokens, 4 blocks of 64: no chunk below is a whole number of blocks
SIZES = ((2,), (3, 4), (1, 3, 2))  # 1D: chunks of 2, 2, 1 frames (ragged); 2D: 4 tiles of 60; 3D: 40 cubes of 6
CASES = [  # (partition, options)
    (0, dict(vmoba_select="topk", vmoba_topk=(2, 2, 2))),
    (1, dict(vmoba_select="topk", vmoba_topk=(2, 2, 2))),
    (2, dict(vmoba_select="topk", vmoba_topk=(9, 9, 9))),
    (0, dict(vmoba_select="threshold", tau=0.25)),  # the official default mode
    (1, dict(vmoba_select="threshold", tau=0.25)),
    (2, dict(vmoba_select="threshold", tau=0.25)),
    (2, dict(vmoba_select="threshold", tau=0.5, vmoba_scope="head_global")),
    (1, dict(vmoba_select="threshold", tau=0.25, vmoba_scope="head_global")),
]


def _run(grid, sizes, partition, options, q, k, v):
    cfg = resolve_config("vmoba-paper", vmoba_chunk_size=sizes, min_tokens=0, dense_steps=0, **options)
    method = build_method(cfg)
    call = make_call(q, k, v, cfg, layout=TokenLayout(grid=grid), site_index=partition)
    return method, call, method.attend(call)


def _official(grid, sizes, partition, options, q, k, v):
    chunk, order = official_partition(grid, sizes[partition])
    mode = options["vmoba_select"]
    topk = options.get("vmoba_topk", (0, 0, 0))[partition]
    sel, outs, dense_all = [], [], []
    for b in range(q.shape[0]):  # the official code sees one sample per call
        s, dense = official_selection(
            q[b], k[b], chunk, order, mode, topk, options.get("tau", 0.25), options.get("vmoba_scope", "query_head")
        )
        sel.append(s)
        outs.append(official_output(q[b], k[b], v[b], chunk, s, dense))
        dense_all.append(dense)
    return chunk, torch.stack(sel), torch.stack(outs), dense_all


@pytest.mark.parametrize(("partition", "options"), CASES)
@pytest.mark.parametrize("inputs", ["random", "structured"])
def test_selection_and_output_match_the_official_code(rng, partition, options, inputs):
    q, k, v = _inputs(inputs, GRID, rng)
    method, call, result = _run(GRID, SIZES, partition, options, q, k, v)
    chunk, theirs, want, dense = _official(GRID, SIZES, partition, options, q, k, v)
    assert not any(dense)
    allowed = theirs[..., chunk]  # (B, H, N_q, N_k): the official key set of each query token
    ours = ours_token_mask(method, call)
    assert torch.equal(ours, allowed)
    # the choice is per token: some kernel query block holds tokens that chose different chunks
    perm = method.plan(call).perm
    rows = (theirs[:, :, perm] if perm is not None else theirs)[:, :, :192].unflatten(2, (3, 64))
    assert bool((rows != rows[:, :, :, :1]).any()), "the test needs query blocks whose tokens disagree"
    torch.testing.assert_close(result.out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inputs", ["random", "structured"])
def test_ragged_and_two_chunk_1d(rng, inputs):
    """5 frames in chunks of 3: a ragged last chunk of 2 frames, and two chunks only, where the tie between the own
    chunk and the other one at the row minimum (both 0 after normalisation) decides the threshold selection."""
    sizes = ((3,), (3, 4), (1, 3, 2))
    for options in (dict(vmoba_select="threshold", tau=0.25), dict(vmoba_select="topk", vmoba_topk=(2, 2, 2))):
        q, k, v = _inputs(inputs, GRID, rng)
        method, call, result = _run(GRID, sizes, 0, options, q, k, v)
        chunk, theirs, want, _ = _official(GRID, sizes, 0, options, q, k, v)
        assert int(chunk.max()) == 1 and int((chunk == 1).sum()) == 2 * 6 * 8
        assert torch.equal(ours_token_mask(method, call), theirs[..., chunk])
        torch.testing.assert_close(result.out.double(), want, atol=1e-5, rtol=1e-5)


def test_chunk_counts_are_the_official_sizes_where_they_divide(rng):
    """The preset's counts (7 | 6 x 4 | 3 x 6 x 4) on Wan2.1 480p's 21 x 30 x 52 latent grid are the paper's
    chunk sizes 3 frames | 5 x 13 | 7 x 5 x 13: the same partition as the official code's."""
    from dit_accel.patterns.vmoba import vmoba_axis_chunks

    grid = (21, 30, 52)
    counts = ((7,), (6, 4), (3, 6, 4))
    for partition, size in enumerate(((3,), (5, 13), (7, 5, 13))):
        f, h, w = vmoba_axis_chunks(grid, partition, counts[partition])
        nt = (int(f[-1]) + 1, int(h[-1]) + 1, int(w[-1]) + 1)
        ours = ((f.view(-1, 1, 1) * nt[1] + h.view(1, -1, 1)) * nt[2] + w.view(1, 1, -1)).flatten()
        theirs, _ = official_partition(grid, size)
        assert torch.equal(ours, theirs)


def test_sizes_that_do_not_divide_are_refused():
    q = torch.randn(1, 1, 240, 8)
    for partition, sizes in ((1, ((2,), (4, 4), (1, 3, 2))), (2, ((2,), (3, 4), (2, 3, 2)))):
        with pytest.raises(ValueError, match=rf"vmoba_chunk_size\[{partition}\].*does not divide"):
            _run(GRID, sizes, partition, dict(vmoba_select="topk"), q, q, q)
    # 1D sizes need not divide (the last chunk is shorter), as in the official code
    _run(GRID, ((4,), (3, 4), (1, 3, 2)), 0, dict(vmoba_select="topk", vmoba_topk=(2, 2, 2)), q, q, q)


def _site_call(cfg, q, k, v, grid, site):
    group = SiteGroup(cfg)
    state = DenoiseState(step=0, num_steps=4, branch="cond", layout=TokenLayout(grid=grid), active=True)
    out = group.site(site).attend(q, k, v, state=state, dense=lambda: F.scaled_dot_product_attention(q, k, v))
    return out, group.stats()["overall"]


@pytest.mark.parametrize(
    ("options", "partition"),
    [
        (dict(vmoba_select="topk", vmoba_topk=(1, 1, 1)), 1),  # top-1: the own chunk only
        (dict(vmoba_select="threshold", tau=0.25), 0),  # one chunk: 1D chunks of 5 frames on 5 frames
    ],
)
def test_own_chunk_only_falls_back_to_dense(rng, options, partition):
    sizes = ((5,), (3, 4), (1, 3, 2))
    q, k, v = (x.float() for x in _inputs("random", GRID, rng))
    cfg = resolve_config("vmoba-paper", vmoba_chunk_size=sizes, min_tokens=0, dense_steps=0, **options)
    _, theirs_dense = official_selection(
        q[0].double(), k[0].double(), *official_partition(GRID, sizes[partition]), options["vmoba_select"],
        options.get("vmoba_topk", (0, 0, 0))[partition],
    )  # fmt: skip
    assert theirs_dense
    out, stats = _site_call(cfg, q, k, v, GRID, partition)
    assert stats["dense_reasons"] == {"vmoba_local": 1} and stats["sparse_calls"] == 0
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    # called past the dense decision, the pattern itself turns every chunk on: the same dense output
    _, _, result = _run(GRID, sizes, partition, options, q.double(), k.double(), v.double())
    torch.testing.assert_close(result.out.double(), brute_attention(q, k, v)[0], atol=1e-5, rtol=1e-5)
    # two chunks at top-1 in 1D stay dense too; top-2 does not
    cfg2 = resolve_config("vmoba-paper", vmoba_chunk_size=((3,), (3, 4), (1, 3, 2)), min_tokens=0, dense_steps=0)
    for topk, reason in (((1, 1, 1), {"vmoba_local": 1}), ((2, 2, 2), {})):
        _, stats = _site_call(cfg2.replace(vmoba_topk=topk), q, k, v, GRID, 0)
        assert stats["dense_reasons"] == reason


def test_block_level_gating_is_not_the_official_selection(rng):
    """The planted bug the tests above must catch: ``vmoba_gate="block"`` (ours, in ``vmoba``) chooses per query
    block, so its token-level key sets differ from the official ones."""
    q, k, v = _inputs("structured", GRID, rng)
    options = dict(vmoba_select="topk", vmoba_topk=(2, 2, 2))
    _, theirs, _, _ = _official(GRID, SIZES, 1, options, q, k, v)[:4]
    cfg = resolve_config("vmoba-paper", vmoba_chunk_size=SIZES, vmoba_gate="block", min_tokens=0, **options)
    method = build_method(cfg)
    call = make_call(q, k, v, cfg, layout=TokenLayout(grid=GRID), site_index=1)
    method.attend(call)
    pattern = call.cache.pattern
    n = math.prod(GRID)
    blocks = kernels.reference.selected_block_mask(pattern.kv_indices, pattern.kv_counts, math.ceil(n / 64))
    pos = torch.arange(n)
    tok = blocks[..., pos // 64, :][..., pos // 64]
    inv = method.plan(call).inv
    tok = tok[..., inv, :][..., inv]
    chunk, _ = official_partition(GRID, SIZES[1])
    assert not torch.equal(tok.expand(2, 2, -1, -1), theirs[..., chunk])


@pytest.mark.skipif(not kernels._triton_available(), reason="Triton is not installed")
@pytest.mark.parametrize("partition", [1, 2])
def test_the_triton_kernel_computes_the_same_token_gating(rng, monkeypatch, partition):
    """The same selection through the Triton kernel (the interpreter on a CPU): float32, as the kernels take."""
    q, k, v = (x.float() for x in _inputs("structured", GRID, rng, b=1))
    options = dict(vmoba_select="threshold", tau=0.25)
    _, _, want = _run(GRID, SIZES, partition, options, q, k, v)
    monkeypatch.setenv("DIT_ACCEL_KERNELS", "triton")
    _, call, got = _run(GRID, SIZES, partition, options, q, k, v)
    assert kernels.backend_for(q.device) == "triton" and call.cache.pattern.query_groups is not None
    torch.testing.assert_close(got.out, want.out, atol=2e-5, rtol=2e-5)

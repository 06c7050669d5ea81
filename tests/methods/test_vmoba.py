"""VMoBA: partitions are permutations with contiguous chunks; global threshold and top-k selection rules."""

from __future__ import annotations

import pytest
import torch
from _method_helpers import qkv, run_method

from dit_accel import kernels
from dit_accel.config import resolve_config
from dit_accel.layout import TokenLayout
from dit_accel.patterns import plan_for
from dit_accel.patterns.vmoba import partition_of, vmoba_axis_chunks, vmoba_threshold, vmoba_topk


@pytest.mark.parametrize(
    "layout",
    [
        TokenLayout(grid=(21, 30, 52)),
        TokenLayout(grid=(5, 10, 13), text_tokens=30, text_first=True),
        TokenLayout(grid=(3, 7, 9), text_tokens=11, text_first=False),
    ],
)
def test_partitions_are_permutations_with_contiguous_chunks(rng, layout):
    cfg = resolve_config("vmoba-paper")
    n = layout.total_tokens
    x = torch.randn(1, 1, n, 4, generator=rng)
    for site in range(3):
        plan = plan_for(cfg, layout, n, site, torch.device("cpu"))
        perm = plan.perm if plan.perm is not None else torch.arange(n)
        assert torch.equal(torch.sort(perm).values, torch.arange(n))
        if plan.perm is not None:
            assert torch.equal(kernels.permute_tokens(kernels.permute_tokens(x, plan.perm), plan.inv), x)
        group = plan.groups.group_of
        assert torch.equal(group[layout.text_slice()], torch.full((layout.text_tokens,), -1))
        video = group[group >= 0]
        assert bool((video[1:] >= video[:-1]).all())  # each chunk is one contiguous run
        # the chunk of each token matches its coordinates: chunk x * c // e along an axis of extent e split c ways
        partition = partition_of(site)
        f, h, w = layout.grid
        native = perm[group >= 0] - layout.video_start
        coords = [native // (h * w), native // w % h, native % w]
        axes = vmoba_axis_chunks(layout.grid, partition, cfg.vmoba_chunks[partition])
        nt = [int(a[-1]) + 1 for a in axes]
        counts = dict(zip({0: (0,), 1: (1, 2), 2: (0, 1, 2)}[partition], cfg.vmoba_chunks[partition]))
        assert nt == [min(counts.get(i, 1), g) for i, g in enumerate(layout.grid)]  # exactly the counts asked
        for i, c in enumerate(coords):
            assert torch.equal(axes[i][c], c * nt[i] // layout.grid[i])
        want = (axes[0][coords[0]] * nt[1] + axes[1][coords[1]]) * nt[2] + axes[2][coords[2]]
        assert torch.equal(video, want)


def test_chunk_counts_are_honoured():
    """(7,) on 8 frames is 7 chunks (one of 2 frames, six of 1), not ceil-sized chunks of 2 (4 chunks); on Wan2.1
    480p's 21 x 30 x 52 the counts give the paper's chunk sizes 3 | 5 x 13 | 7 x 5 x 13."""
    frames = vmoba_axis_chunks((8, 4, 4), 0, (7,))[0]
    assert torch.bincount(frames).tolist() == [2, 1, 1, 1, 1, 1, 1]
    grid, counts = (21, 30, 52), ((7,), (6, 4), (3, 6, 4))
    sizes = {0: [(3,), (30,), (52,)], 1: [(21,), (5,), (13,)], 2: [(7,), (5,), (13,)]}
    for partition in range(3):
        axes = vmoba_axis_chunks(grid, partition, counts[partition])
        assert [tuple(set(torch.bincount(a).tolist())) for a in axes] == sizes[partition]


def test_global_threshold_selects_the_smallest_prefix_reaching_tau(rng):
    for tau in (0.1, 0.25, 0.5, 0.9):
        gate = torch.randn(2, 3, 6, 8, generator=rng)
        self_chunks = torch.zeros(6, 8, dtype=torch.bool)
        self_chunks[torch.arange(6), torch.arange(6)] = True
        mask = vmoba_threshold(gate, self_chunks[None, None], tau)
        for b in range(2):
            for h in range(3):
                g = gate[b, h]
                norm = (g - g.min()) / (g.max() - g.min())
                total = norm.sum()
                m = mask[b, h]
                assert bool(m[self_chunks].all())
                others = m & ~self_chunks
                need = tau * total - norm[self_chunks].sum()
                got = norm[others]
                if float(need) <= 0:
                    assert got.numel() == 0
                    continue
                assert float(got.sum()) >= float(need) - 1e-5  # reaches tau
                assert float(got.sum() - got.min()) < float(need) + 1e-6  # and no shorter prefix does
                rest = norm[~m]
                if rest.numel():
                    assert float(got.min()) >= float(rest.max()) - 1e-6  # the highest pairs come first


def test_topk_counts_include_the_self_chunk(rng):
    gate = torch.randn(1, 2, 5, 7, generator=rng)
    self_chunks = torch.zeros(1, 1, 5, 7, dtype=torch.bool)
    self_chunks[..., torch.arange(5), torch.arange(5)] = True
    mask = vmoba_topk(gate, self_chunks, 3)
    assert bool((mask.sum(-1) == 3).all()) and bool(mask[self_chunks.expand_as(mask)].all())


@pytest.mark.parametrize("select", ["topk", "threshold"])
def test_self_block_always_in(rng, select):
    layout = TokenLayout(grid=(5, 10, 13), text_tokens=30, text_first=True)
    q, k, v = qkv(rng, 1, 2, layout.total_tokens)
    for site in range(3):
        _, call, result = run_method(
            "vmoba",
            q,
            k,
            v,
            layout=layout,
            site_index=site,
            vmoba_select=select,
            **({"tau": 0.05} if select == "threshold" else {}),
            sparsity=0.95,
            compensation="none",
            refresh_every=0,
        )
        n_b = call.cache.pattern.kv_counts.shape[-1]
        mask = kernels.reference.selected_block_mask(call.cache.pattern.kv_indices, call.cache.pattern.kv_counts, n_b)
        assert bool(mask.diagonal(dim1=-2, dim2=-1).all())
        assert float(result.density) < 1.0

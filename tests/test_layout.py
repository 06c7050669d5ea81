import itertools

import torch

from dit_accel.layout import TokenLayout, block_window_mask, inverse_permutation, tile_grid, tile_permutation


def test_tile_permutation_groups_tiles_and_inverts():
    grid, tile = (3, 5, 7), (2, 2, 4)  # ragged on every axis
    perm = tile_permutation(grid, tile)
    n = 3 * 5 * 7
    assert sorted(perm.tolist()) == list(range(n))
    inv = inverse_permutation(perm)
    x = torch.randn(1, 2, n, 3)
    assert torch.equal(x[:, :, perm][:, :, inv], x)
    coords = [(f, h, w) for f in range(3) for h in range(5) for w in range(7)]
    tiles = [tuple(c // t for c, t in zip(coords[i], tile)) for i in perm.tolist()]
    # each tile's tokens are contiguous after the permutation, tiles in frame-row-col order
    seen = []
    for key, _ in itertools.groupby(tiles):
        assert key not in seen
        seen.append(key)
    assert seen == sorted(seen)
    assert len(seen) == 2 * 3 * 2 == tile_grid(grid, tile)[0] * tile_grid(grid, tile)[1] * tile_grid(grid, tile)[2]


def test_block_window_mask_matches_brute_force():
    tiles, radius = (3, 4, 5), (1, 0, 2)
    mask = block_window_mask(tiles, radius)
    coords = list(itertools.product(*(range(t) for t in tiles)))
    for i, a in enumerate(coords):
        for j, b in enumerate(coords):
            inside = all(abs(x - y) <= r for x, y, r in zip(a, b, radius))
            assert bool(mask[i, j]) == inside


def test_token_layout_text_positions():
    first = TokenLayout(grid=(2, 3, 4), text_tokens=5, text_first=True)
    assert first.total_tokens == 29 and first.video_start == 5
    assert first.text_token_mask()[:5].all() and not first.text_token_mask()[5:].any()
    last = TokenLayout(grid=(2, 3, 4), text_tokens=5, text_first=False)
    assert last.text_token_mask()[24:].all() and not last.text_token_mask()[:24].any()
    assert last.block_has_text(16).tolist() == [False, True]


def test_for_tokens_reads_the_text_count_per_call_only_when_asked():
    from dit_accel.layout import TokenLayout

    fixed = TokenLayout(grid=(2, 4, 4), text_tokens=16, text_first=False)
    assert fixed.for_tokens(48) is fixed
    assert fixed.for_tokens(40) is None  # a fixed text count that does not match: the layout does not apply
    per_call = TokenLayout(grid=(2, 4, 4), text_tokens=16, text_first=False, text_per_call=True)
    assert per_call.for_tokens(35).text_tokens == 3 and per_call.for_tokens(35).total_tokens == 35
    assert per_call.for_tokens(31) is None  # fewer tokens than the grid: not this layout

"""Probes of what the toy model learned: how local each self-attention layer and head is, and which prompt words
steer its prediction (:func:`word_influence`).

Forward hooks on every ``attn1`` capture the processor's inputs; q and k are then recomputed exactly as
``WanAttnProcessor`` does (projection, RMS norm across heads, 3D RoPE) and the softmax map is formed with plain torch.
The number reported is the share of attention mass that falls inside a 3D neighbourhood of the query, against the
share a uniform map would put there: ~1x means unstructured, large means local (what window-sparse methods exploit).
Beside it, the mass each query's top 10 % of keys hold (1 = all of it; 0.1 = uniform): what any sparse method that
keeps a tenth of the keys can keep at best, wherever those keys are.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import WanTransformer3DModel

from .data import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES
from .model import model_input


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of ``WanAttnProcessor`` (interleaved pairs), (B, S, H, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


def window_mask(grid: tuple[int, int, int], half: tuple[int, int, int]) -> torch.Tensor:
    """Bool (N, N): key within ``half`` = (dt, dh, dw) of the query on the frame-major token grid."""
    t, h, w = grid
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()], 1)
    diff = (coords[:, None, :] - coords[None, :, :]).abs()
    return (diff <= torch.tensor(half)).all(-1)


class AttentionProbe:
    """Accumulates per-layer, per-head window mass while attached to a transformer."""

    def __init__(self, transformer: WanTransformer3DModel, half: tuple[int, int, int] = (1, 2, 2)) -> None:
        self.transformer, self.half = transformer, half
        self.grid: tuple[int, int, int] | None = None
        self.mass: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.top_mass: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.uniform: float | None = None
        self.enabled = True
        self._mask: torch.Tensor | None = None

    @torch.no_grad()
    def _hook(self, layer: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.enabled or self.grid is None:
            return
        x = args[0]
        rotary = args[3] if len(args) > 3 else kwargs.get("rotary_emb")
        q = module.norm_q(module.to_q(x)).unflatten(2, (module.heads, -1))
        k = module.norm_k(module.to_k(x)).unflatten(2, (module.heads, -1))
        if rotary is not None:
            q, k = _rope(q, *rotary), _rope(k, *rotary)
        q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()  # (B, H, N, D)
        if self._mask is None or self._mask.shape[0] != q.shape[2]:
            self._mask = window_mask(self.grid, self.half)
            self.uniform = float(self._mask.float().mean())
        probs = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        share = (probs * self._mask).sum(-1).mean(-1)  # (B, H)
        self.mass[layer].append(share.mean(0).cpu())
        top = probs.topk(max(1, probs.shape[-1] // 10), dim=-1).values.sum(-1).mean(-1)  # (B, H)
        self.top_mass[layer].append(top.mean(0).cpu())

    @contextmanager
    def attached(self, grid: tuple[int, int, int]) -> Iterator[AttentionProbe]:
        """Hook every self-attention module for the duration of the block; ``grid`` is the token grid (T, H, W)."""
        self.grid = grid
        handles = [
            blk.attn1.register_forward_pre_hook(lambda m, a, kw, i=i: self._hook(i, m, a, kw), with_kwargs=True)
            for i, blk in enumerate(self.transformer.blocks)
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def summary(self) -> dict[str, object]:
        """Per layer: mean window share, ratio to uniform, and the per-head ratios."""
        layers = []
        for i in sorted(self.mass):
            heads = torch.stack(self.mass[i]).mean(0)
            top = torch.stack(self.top_mass[i]).mean(0)
            layers.append(
                {
                    "layer": i,
                    "window_share": round(float(heads.mean()), 4),
                    "ratio_to_uniform": round(float(heads.mean()) / self.uniform, 2),
                    "head_ratios": [round(float(v) / self.uniform, 2) for v in heads],
                    "top10_mass": round(float(top.mean()), 3),
                    "head_top10_mass": [round(float(v), 3) for v in top],
                }
            )
        return {
            "window_half": list(self.half),
            "grid": list(self.grid or ()),
            "uniform_share": self.uniform,
            "layers": layers,
        }


WORD_CLASSES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLORS),
    "shape": SHAPES,
    "direction": DIRECTIONS,
    "background": BACKGROUNDS,
}


@torch.no_grad()
def word_influence(
    transformer: WanTransformer3DModel,
    text_encoder: torch.nn.Module,
    scenes: list[tuple[str, str, str, str]],
    size: tuple[int, int, int] = (16, 64, 64),
    sigmas: tuple[float, ...] = (0.9, 0.6),
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """How much each word of a prompt steers the model: the mean absolute change of the predicted clean video
    (``x_t - sigma * v``, pixels in [-1, 1]) when that word is swapped for the next word of its class, with the same
    noise and sigma. Per sigma and word class, averaged over ``scenes`` = (colour, shape, direction, background).
    A word the model ignores scores about 0; it is the earliest sign of whether training has picked a word up."""
    if not scenes:
        raise ValueError("word_influence: scenes must hold at least one (colour, shape, direction, background)")
    out: dict[str, dict[str, float]] = {}
    frames, height, width = size
    param = next(transformer.parameters())
    for sigma in sigmas:
        sums = dict.fromkeys(WORD_CLASSES, 0.0)
        for n, words in enumerate(scenes):
            prompts = [_scene_prompt(*words)]
            for i, vocab in enumerate(WORD_CLASSES.values()):
                swapped = list(words)
                swapped[i] = vocab[(vocab.index(words[i]) + 1) % len(vocab)]
                prompts.append(_scene_prompt(*swapped))
            gen = torch.Generator().manual_seed(seed + n)
            noise = torch.randn(1, 3, frames, height, width, generator=gen).expand(len(prompts), -1, -1, -1, -1)
            noise = noise.to(param.device, param.dtype)
            t = torch.full((len(prompts),), sigma * 1000.0, device=param.device)
            v = transformer(
                model_input(transformer, noise), t, text_encoder.encode(prompts).to(param.dtype), return_dict=False
            )[0]
            x0 = (noise - sigma * v).float()
            for i, name in enumerate(WORD_CLASSES):
                sums[name] += float((x0[i + 1] - x0[0]).abs().mean())
        out[f"sigma_{sigma:g}"] = {name: round(s / len(scenes), 4) for name, s in sums.items()}
    return out


def _scene_prompt(color: str, shape: str, direction: str, background: str) -> str:
    return f"a {color} {shape} moves {direction} over a {background} background"

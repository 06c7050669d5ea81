"""Model-family adapters: which modules are self-attention sites and how tokens are laid out.

Each family names its self-attention modules (cross-attention is never touched), reads the latent grid from
the transformer's forward arguments, and says where text tokens sit in joint attention.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..layout import TokenLayout

__all__ = ["FAMILIES", "Family", "TokenOrderSpec", "find_family"]

GridFn = Callable[[torch.nn.Module, dict[str, Any]], tuple[int, int, int] | None]


@dataclass(frozen=True)
class TokenOrderSpec:
    """Where a family's tokens enter and leave the per-token part of its forward.

    Attributes:
        entry: the patchify module, whose output (B, C, *grid) becomes the token sequence by ``flatten(2)``.
        exit: the module whose (B, N, C') output goes on to the unpatchify.
        per_token: (module, output positions) whose outputs carry the tokens along dim 1 when they have three or
            more dimensions and N there (RoPE frequencies; per-token timestep embeddings).
    """

    entry: str
    exit: str
    per_token: tuple[tuple[str, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class Family:
    """How one diffusers transformer class is accelerated.

    Attributes:
        name: short name shown in stats and docs.
        classes: transformer class names it handles.
        site_pattern: regex over ``named_modules()`` names selecting the self-attention modules.
        grid: latent grid (frames, rows, cols) after patchify, from the forward's bound arguments.
        text_first: joint-attention text position; None when self-attention holds no text.
        timestep_scale: multiply the forward's timestep by this to compare with ``scheduler.timesteps``.
        text_per_call: the text count differs per attention call (see ``TokenLayout.text_per_call``).
        text_count: the joint-attention text count from the bound arguments, when it is not
            ``encoder_hidden_states.shape[1]`` (HunyuanVideo 1.5 joins three text streams).
        square_padding_mask: the processor hands SDPA a boolean (B, 1, N, N) mask that is the outer product of a
            key padding with itself, and its first row is a video token (always valid): that row is the key
            padding (HunyuanVideo 1.5 builds its mask so).
        step_timestep: the timestep that names the denoising step, from the bound arguments, when it is not the
            ``timestep`` argument itself (MiniMax-H3 passes one per noise level in its sequence).
        timestep_rises: the model's timestep goes up as denoising proceeds (MiniMax-H3's ``t = 1 - sigma``), so a
            bare transformer's generation restarts when it drops, not when it rises.
        new_timesteps_new_generation: the pipeline resets no hooks after a call (a modular pipeline), so the
            scheduler's timesteps set anew are what starts a new generation.
        token_order: where the tokens enter and leave the per-token part of the forward, for
            ``tile_permutation="per_forward"`` (:mod:`dit_accel.pipelines.token_order`); None: not supported.
    """

    name: str
    classes: tuple[str, ...]
    site_pattern: str
    grid: GridFn
    text_first: bool | None = None
    timestep_scale: float = 1.0
    text_per_call: bool = False
    text_count: Callable[[dict[str, Any]], int] | None = None
    square_padding_mask: bool = False
    step_timestep: Callable[[dict[str, Any]], Any] | None = None
    timestep_rises: bool = False
    new_timesteps_new_generation: bool = False
    token_order: TokenOrderSpec | None = None

    def sites(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        pattern = re.compile(self.site_pattern)
        return [(name, mod) for name, mod in transformer.named_modules() if pattern.fullmatch(name)]

    def bind(self, transformer: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        forward = type(transformer).forward
        try:
            return dict(inspect.signature(forward).bind_partial(transformer, *args, **kwargs).arguments)
        except TypeError:
            return dict(kwargs)

    def layout(self, transformer: torch.nn.Module, bound: dict[str, Any]) -> TokenLayout | None:
        grid = self.grid(transformer, bound)
        if grid is None:
            return None
        text = 0
        if self.text_first is not None and self.text_count is not None:
            text = self.text_count(bound)
        elif self.text_first is not None:
            ehs = bound.get("encoder_hidden_states")
            text = int(ehs.shape[1]) if isinstance(ehs, torch.Tensor) else 0
        return TokenLayout(
            grid=grid, text_tokens=text, text_first=bool(self.text_first), text_per_call=self.text_per_call
        )


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def _wan_grid(model: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int] | None:
    hs = bound.get("hidden_states")
    if not isinstance(hs, torch.Tensor) or hs.dim() != 5:
        return None
    pt, ph, pw = model.config.patch_size
    return hs.shape[2] // pt, hs.shape[3] // ph, hs.shape[4] // pw


def _cogvideox_grid(model: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int] | None:
    hs = bound.get("hidden_states")
    if not isinstance(hs, torch.Tensor) or hs.dim() != 5:
        return None
    p = model.config.patch_size
    pt = model.config.patch_size_t or 1
    frames = (hs.shape[1] + pt - 1) // pt
    return frames, hs.shape[3] // p, hs.shape[4] // p


def _hunyuan_grid(model: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int] | None:
    hs = bound.get("hidden_states")
    if not isinstance(hs, torch.Tensor) or hs.dim() != 5:
        return None
    p, pt = model.config.patch_size, model.config.patch_size_t
    return hs.shape[2] // pt, hs.shape[3] // p, hs.shape[4] // p


def _ltx_grid(model: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int] | None:
    f, h, w = bound.get("num_frames"), bound.get("height"), bound.get("width")
    hs = bound.get("hidden_states")
    if None in (f, h, w) or not isinstance(hs, torch.Tensor):
        return None
    p, pt = model.config.patch_size, model.config.patch_size_t
    grid = (int(f), int(h), int(w))
    if grid[0] * grid[1] * grid[2] != hs.shape[1]:
        grid = (int(f) // pt, int(h) // p, int(w) // p)
    return grid


def _pixart_grid(model: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int] | None:
    hs = bound.get("hidden_states")
    if not isinstance(hs, torch.Tensor) or hs.dim() != 4:
        return None
    p = model.config.patch_size
    return 1, hs.shape[2] // p, hs.shape[3] // p


_FLUX_GRIDS: dict[tuple, tuple[int, int]] = {}  # img_ids tensor -> (rows, cols): read once, not every step


def _flux_grid(model: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int] | None:
    ids = bound.get("img_ids")
    hs = bound.get("hidden_states")
    if not isinstance(ids, torch.Tensor) or not isinstance(hs, torch.Tensor):
        return None
    ids = ids[0] if ids.dim() == 3 else ids
    # the pipeline builds img_ids once per generation: its extent costs one host sync then, none per step
    key = (ids.data_ptr(), ids._version, tuple(ids.shape), ids.device)
    if key not in _FLUX_GRIDS:
        if len(_FLUX_GRIDS) > 64:
            _FLUX_GRIDS.clear()
        extent = (ids[:, 1:3].amax(0) - ids[:, 1:3].amin(0) + 1).tolist()
        _FLUX_GRIDS[key] = (int(extent[0]), int(extent[1]))
    rows, cols = _FLUX_GRIDS[key]
    if rows * cols != hs.shape[1]:
        return 1, 1, int(hs.shape[1])
    return 1, rows, cols


def _hunyuan15_text(bound: dict[str, Any]) -> int:
    """HunyuanVideo 1.5 appends to the video, per sample, its image, ByT5 and MLLM tokens (valid ones first, then
    the padded ones, which its mask hides): all of them sit in self-attention."""
    total = 0
    for name in ("image_embeds", "encoder_hidden_states_2", "encoder_hidden_states"):
        value = bound.get(name)
        total += int(value.shape[1]) if isinstance(value, torch.Tensor) and value.dim() == 3 else 0
    return total


def _mochi_grid(model: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int] | None:
    """Mochi patchifies each frame alone (no temporal patch): (frames, rows // p, cols // p)."""
    hs = bound.get("hidden_states")
    if not isinstance(hs, torch.Tensor) or hs.dim() != 5:
        return None
    p = model.config.patch_size
    return hs.shape[2], hs.shape[3] // p, hs.shape[4] // p


#: MiniMax-H3's modality tag of a video row (``MINIMAX_H3_VIDEO_TAG``: 0 video, 1 text, 2 audio)
_MINIMAX_H3_VIDEO_TAG = 0
_MINIMAX_H3_GRIDS: dict[tuple, tuple[int, int, int] | None] = {}  # layout tensors -> target grid: read once


def _minimax_h3_target(position_ids: torch.Tensor, token_tags: torch.Tensor) -> tuple[int, int, int] | None:
    """(frames, rows, cols) of the target video: the trailing video-tagged rows whose (t, h, w) position ids are
    one raster frame repeated at strictly rising times; None when the sequence does not end so.

    The pipelines pack ``[text | conditioning | target audio | target video]``, the target frame-major then
    row-major (as their patchify). Walking back frame by frame stops at the audio rows (another tag), at a keyframe
    anchored first (frame 0's time) or last (a later time), or at a block on another frame grid. A video block on
    the same grid right before the target, with no audio between, would be read as target frames (the pipelines
    never build one: they always generate audio)."""
    pos = position_ids.detach().to("cpu", torch.float64)
    tags = token_tags.detach().cpu()
    n = pos.shape[0]
    if n == 0 or tags.shape != (n,) or int(tags[-1]) != _MINIMAX_H3_VIDEO_TAG:
        return None
    others = (tags != _MINIMAX_H3_VIDEO_TAG).nonzero()
    start = int(others[-1]) + 1 if others.numel() else 0  # the trailing run of video rows
    times = pos[start:, 0]
    per_frame = int((times == times[-1]).flip(0).int().cumprod(0).sum())  # the last frame: rows at the last time
    frame = pos[n - per_frame :, 1:]
    rows, cols = frame[:, 0].unique(), frame[:, 1].unique()  # sorted
    raster = torch.stack((rows.repeat_interleave(cols.numel()), cols.repeat(rows.numel())), dim=-1)
    if rows.numel() * cols.numel() != per_frame or not torch.equal(frame, raster):
        return None
    frames, end, later = 1, n - per_frame, float(times[-1])
    while end - per_frame >= start:
        block = pos[end - per_frame : end]
        t = float(block[0, 0])
        if not (bool((block[:, 0] == t).all()) and t < later and torch.equal(block[:, 1:], frame)):
            break
        frames, end, later = frames + 1, end - per_frame, t
    return frames, int(rows.numel()), int(cols.numel())


def _minimax_h3_grid(model: torch.nn.Module, bound: dict[str, Any]) -> tuple[int, int, int] | None:
    """MiniMax-H3's target video grid, from ``position_ids`` and ``token_tags`` (built once per generation: read
    on the host then, cached by tensor, so no sync per step)."""
    pos, tags, hs = bound.get("position_ids"), bound.get("token_tags"), bound.get("hidden_states")
    if not all(isinstance(t, torch.Tensor) for t in (pos, tags, hs)) or pos.dim() != 2 or hs.dim() != 3:
        return None
    key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.device) for t in (pos, tags))
    if key not in _MINIMAX_H3_GRIDS:
        if len(_MINIMAX_H3_GRIDS) > 64:
            _MINIMAX_H3_GRIDS.clear()
        _MINIMAX_H3_GRIDS[key] = _minimax_h3_target(pos, tags)
    grid = _MINIMAX_H3_GRIDS[key]
    if grid is None or grid[0] * grid[1] * grid[2] > hs.shape[1]:  # more target rows than video rows: stale
        return None
    return grid


def _minimax_h3_text(bound: dict[str, Any]) -> int:
    """Every row before the target video (text, keyframe or reference conditioning, audio) is leading text, kept
    dense as queries and keys: the sequence length less the grid (read just before, from the cache)."""
    f, h, w = _minimax_h3_grid(None, bound) or (0, 0, 0)  # type: ignore[arg-type]  # the model is not read
    return int(bound["position_ids"].shape[0]) - f * h * w


def _minimax_h3_timestep(bound: dict[str, Any]) -> Any:
    """The target video's timestep, the last row's: ``timestep`` holds the distinct values of the sequence (target
    video and audio, held conditioning) and ``timestep_indices`` each row's index into them. A slice: no sync."""
    timestep, indices = bound.get("timestep"), bound.get("timestep_indices")
    if not isinstance(timestep, torch.Tensor) or timestep.dim() != 1 or not isinstance(indices, torch.Tensor):
        return timestep
    if indices.numel() == 0:
        return timestep
    return timestep.index_select(0, indices.reshape(-1)[-1:].to(timestep.device))


FAMILIES: tuple[Family, ...] = (
    Family(
        "wan",
        ("WanTransformer3DModel",),
        r"blocks\.\d+\.attn1",
        _wan_grid,
        # RoPE's (cos, sin) and Wan 2.2 TI2V's per-token temb / timestep_proj carry the tokens at dim 1
        token_order=TokenOrderSpec("patch_embedding", "proj_out", (("rope", (0, 1)), ("condition_embedder", (0, 1)))),
    ),
    # VACE: the control blocks' attn1 is self-attention over the control tokens, laid out on the video's grid
    # (padded with zeros to its length), so they are sites too, after the main blocks in site order
    Family("wan_vace", ("WanVACETransformer3DModel",), r"(blocks|vace_blocks)\.\d+\.attn1", _wan_grid),
    Family(
        "cogvideox",
        ("CogVideoXTransformer3DModel",),
        r"transformer_blocks\.\d+\.attn1",
        _cogvideox_grid,
        text_first=True,
    ),
    Family(
        "hunyuan_video",
        ("HunyuanVideoTransformer3DModel",),
        r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn",
        _hunyuan_grid,
        text_first=False,
    ),
    Family("ltx_video", ("LTXVideoTransformer3DModel",), r"transformer_blocks\.\d+\.attn1", _ltx_grid),
    Family("pixart", ("PixArtTransformer2DModel",), r"transformer_blocks\.\d+\.attn1", _pixart_grid),
    Family(
        "flux",
        ("FluxTransformer2DModel",),
        r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn",
        _flux_grid,
        text_first=True,
        timestep_scale=1000.0,
    ),
    # Animate: attn1 is video self-attention; face_adapter.* attends from each frame's tokens to that frame's
    # motion tokens (cross-attention) and the pose latents are added to the video tokens before the blocks
    Family("wan_animate", ("WanAnimateTransformer3DModel",), r"blocks\.\d+\.attn1", _wan_grid),
    # SkyReels-V2: Wan's layout; with num_frame_per_block > 1 (diffusion forcing's causal blocks) attn1 gets a
    # boolean block-causal (1, 1, N, N) mask, which is not key padding, so those calls stay dense (attn_mask)
    Family("skyreels_v2", ("SkyReelsV2Transformer3DModel",), r"blocks\.\d+\.attn1", _wan_grid),
    # Flux 2: joint attention with the text first in both block kinds; img ids are (T, H, W, L), read as Flux's
    Family(
        "flux2",
        ("Flux2Transformer2DModel",),
        r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn",
        _flux_grid,
        text_first=True,
        timestep_scale=1000.0,
    ),
    # Cosmos: attn1 is video self-attention (no text in it); attn2 is cross-attention. patch_size is (t, h, w).
    Family("cosmos", ("CosmosTransformer3DModel",), r"transformer_blocks\.\d+\.attn1", _wan_grid),
    # Mochi: joint attention, text after video; each sample's padded prompt tokens are dropped before its own SDPA
    # call, so the text count is read per call.
    Family(
        "mochi",
        ("MochiTransformer3DModel",),
        r"transformer_blocks\.\d+\.attn1",
        _mochi_grid,
        text_first=False,
        text_per_call=True,
    ),
    # LTX-2: attn1 is video self-attention; audio_attn1 (audio self-attention), attn2 / audio_attn2 (text) and the
    # audio<->video cross-attentions are left untouched. The grid comes from num_frames/height/width as in LTX.
    Family("ltx2_video", ("LTX2VideoTransformer3DModel",), r"transformer_blocks\.\d+\.attn1", _ltx_grid),
    # HunyuanVideo 1.5: one joint `attn` per block, text last; the token refiner's own attention is not a site.
    Family(
        "hunyuan_video15",
        ("HunyuanVideo15Transformer3DModel",),
        r"transformer_blocks\.\d+\.attn",
        _hunyuan_grid,
        text_first=False,
        text_count=_hunyuan15_text,
        square_padding_mask=True,
    ),
    # MiniMax-H3: one packed sequence [text | conditioning | target audio | target video] in full self-attention;
    # every row before the trailing target video is leading "text" (dense). The step is the target video's
    # timestep (t = 1 - sigma, rising, as the video scheduler's timesteps); the token refiner's attn is not a site.
    Family(
        "minimax_h3",
        ("MiniMaxH3Transformer3DModel",),
        r"transformer_blocks\.\d+\.attn",
        _minimax_h3_grid,
        text_first=True,
        text_count=_minimax_h3_text,
        step_timestep=_minimax_h3_timestep,
        timestep_rises=True,
        new_timesteps_new_generation=True,
    ),
)


def find_family(transformer: Any) -> Family | None:
    """The family adapter for a transformer instance (by class name along its MRO), or None."""
    names = {cls.__name__ for cls in type(transformer).__mro__}
    for family in FAMILIES:
        if names.intersection(family.classes):
            return family
    return None

"""Model construction and the flow-matching objective shared by training, tests and evaluation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from .text import ToyTextEncoder

# Pixel space: 3 RGB channels in [-1, 1], patch (1, 4, 4): 16 frames x 64 x 64 -> 16 x 16 x 16 = 4096 tokens.
DEFAULT_MODEL: dict[str, Any] = {
    "dim": 128,
    "heads": 2,
    "layers": 4,
    "ffn_dim": 512,
    "patch_size": [1, 4, 4],
    "freq_dim": 64,
    "text_dim": 64,
    "text_layers": 1,
    "text_heads": 4,
    "text_ffn_dim": 128,
    "max_length": 24,
    "flow_shift": 3.0,
    "coord_channels": False,
}

#: planes appended to the pixels by ``coord_channels``: 3 = (frame, row, column); 5 adds frame x row and
#: frame x column, where an object moving along an axis is a linear function
COORD_CHOICES = (0, 3, 5)


def build_transformer(cfg: dict[str, Any]) -> WanTransformer3DModel:
    """A stock Wan transformer with a small config, so dit_accel treats it exactly like a real Wan model."""
    return WanTransformer3DModel(
        patch_size=tuple(cfg["patch_size"]),
        num_attention_heads=cfg["heads"],
        attention_head_dim=cfg["dim"] // cfg["heads"],
        in_channels=3 + coord_channels(cfg),
        out_channels=3,
        text_dim=cfg["text_dim"],
        freq_dim=cfg["freq_dim"],
        ffn_dim=cfg["ffn_dim"],
        num_layers=cfg["layers"],
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=256,
    )


def coord_channels(cfg: dict[str, Any]) -> int:
    """How many coordinate planes the config asks for (``coord_channels``: false/true or one of COORD_CHOICES)."""
    value = cfg.get("coord_channels", 0)
    n = 3 if value is True else 0 if value is False else value
    if n not in COORD_CHOICES:
        raise ValueError(f"model.coord_channels={value!r}: expected one of {COORD_CHOICES} (or true for 3)")
    return n


def coordinate_planes(x: torch.Tensor, n: int = 3) -> torch.Tensor:
    """(B, n, F, H, W) planes of each pixel's frame, row and column, each spanning [-1, 1] over the clip, and for
    ``n`` = 5 also frame x row and frame x column."""
    b, _, f, h, w = x.shape
    axes = [
        torch.linspace(-1.0, 1.0, m, device=x.device, dtype=x.dtype) if m > 1 else x.new_zeros(1) for m in (f, h, w)
    ]
    t, y, c = torch.meshgrid(*axes, indexing="ij")
    planes = [t, y, c] + ([t * y, t * c] if n == 5 else [])
    return torch.stack(planes).unsqueeze(0).expand(b, -1, -1, -1, -1)


def model_input(transformer: WanTransformer3DModel, x: torch.Tensor) -> torch.Tensor:
    """What the transformer reads for pixels ``x``: ``x`` itself, or ``x`` with its coordinate planes appended on
    the channel axis (like Wan image-to-video's concatenated condition) when the model was built with
    ``coord_channels``; Wan's RoPE is relative, so these planes are the model's only sense of where in the frame
    and the clip a token is."""
    extra = transformer.config.in_channels - x.shape[1]
    if extra == 0:
        return x
    if extra not in COORD_CHOICES:
        raise ValueError(
            f"model_input: the transformer reads {transformer.config.in_channels} channels and pixels have "
            f"{x.shape[1]}; the difference must be one of {COORD_CHOICES} coordinate planes"
        )
    return torch.cat([x, coordinate_planes(x, extra)], dim=1)


def build_text_encoder(cfg: dict[str, Any]) -> ToyTextEncoder:
    """The small word-level encoder whose output width is the transformer's ``text_dim``."""
    return ToyTextEncoder(
        embed_dim=cfg["text_dim"],
        num_layers=cfg["text_layers"],
        num_heads=cfg["text_heads"],
        ffn_dim=cfg["text_ffn_dim"],
        max_length=cfg["max_length"],
    )


def build_scheduler(cfg: dict[str, Any]) -> FlowMatchEulerDiscreteScheduler:
    """Euler sampler over the same shifted sigmas the model was trained on."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg["flow_shift"])


def sample_sigmas(n: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal sigmas, shifted like the sampler's schedule so training effort matches where sampling goes."""
    u = torch.sigmoid(torch.randn(n, generator=generator, device=generator.device))
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(
    transformer: WanTransformer3DModel,
    text_encoder: ToyTextEncoder,
    x0: torch.Tensor,
    prompts: list[str],
    shift: float,
    generator: torch.Generator,
    cond_drop: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Rectified flow: x_t = (1 - s) x0 + s eps, predict v = eps - x0 (Wan's parametrisation), timestep = 1000 s."""
    b = x0.shape[0]
    # Dropped prompts (for CFG) become the empty prompt's embedding, all zeros, on the device: no host read.
    keep = torch.rand(b, generator=generator, device=generator.device) >= cond_drop if cond_drop > 0 else None
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)  # on the GPU if it is
    sigma = sample_sigmas(b, shift, generator).to(device)
    x0 = x0.to(device)
    s = sigma.view(b, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    emb = text_encoder.encode(prompts)
    if keep is not None:
        emb = torch.where(keep.to(emb.device)[:, None, None], emb, torch.zeros_like(emb))
    pred = transformer(model_input(transformer, xt), sigma * 1000.0, emb, return_dict=False)[0]
    return F.mse_loss(pred.float(), (noise - x0).float())

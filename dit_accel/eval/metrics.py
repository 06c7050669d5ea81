"""Quality metrics between an accelerated video and the dense video of the same prompt and seed.

Frames are (F, H, W, 3) or (F, 3, H, W) arrays/tensors in [0, 1] (what ``output_type="np"`` returns). Every
metric is computed per frame and averaged, so a clip of any length compares like a batch of images. LPIPS
runs only when its backbone weights are already on disk: it never downloads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "PSNR_IDENTICAL",
    "LPIPSUnavailable",
    "compare_videos",
    "latent_relative_error",
    "load_lpips",
    "lpips",
    "lpips_unavailable_reason",
    "psnr",
    "relative_error",
    "ssim",
    "temporal_flicker",
]

#: PSNR reported for identical videos (a finite number keeps JSON valid and plots sane).
PSNR_IDENTICAL = 100.0

_LPIPS_BACKBONES = {"alex": ("alexnet", "AlexNet_Weights"), "vgg": ("vgg16", "VGG16_Weights")}
_LPIPS_CACHE: dict[str, Any] = {}


class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot run offline here; the message is the one-line reason."""


def _as_frames(video: Any) -> torch.Tensor:
    """(F, 3, H, W) float64 tensor in [0, 1] from (F, H, W, 3) / (F, 3, H, W) / a single image."""
    x = torch.as_tensor(np.asarray(video) if not isinstance(video, torch.Tensor) else video)
    x = x.detach().to("cpu", torch.float64)
    if x.dim() == 5 and x.shape[0] == 1:  # (1, F, ...) straight from a pipeline output
        x = x[0]
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"video must be (F, H, W, C) or (F, C, H, W); got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.permute(0, 3, 1, 2)
    return x


def _pair(test: Any, reference: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_frames(test), _as_frames(reference)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: test {tuple(a.shape)} vs reference {tuple(b.shape)}")
    return a, b


def psnr(test: Any, reference: Any, data_range: float = 1.0) -> float:
    """Mean per-frame PSNR in dB; :data:`PSNR_IDENTICAL` when the videos are identical."""
    a, b = _pair(test, reference)
    mse = ((a - b) ** 2).flatten(1).mean(dim=1)
    values = [
        PSNR_IDENTICAL if m == 0 else min(PSNR_IDENTICAL, 10.0 * math.log10(data_range**2 / float(m))) for m in mse
    ]
    return float(sum(values) / len(values))


def ssim(test: Any, reference: Any, data_range: float = 1.0) -> float:
    """Mean per-frame SSIM (torchmetrics, Gaussian window 11, shrunk for frames smaller than that)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _pair(test, reference)
    size = min(11, a.shape[-1], a.shape[-2])
    size = size if size % 2 == 1 else size - 1
    sigma = 1.5 * size / 11
    value = structural_similarity_index_measure(
        a.float(), b.float(), data_range=data_range, kernel_size=size, sigma=sigma, reduction="elementwise_mean"
    )
    return float(value)


def temporal_flicker(video: Any) -> float:
    """Mean absolute change between consecutive frames, in [0, 1] units; 0 for a single frame."""
    x = _as_frames(video)
    if x.shape[0] < 2:
        return 0.0
    return float((x[1:] - x[:-1]).abs().mean())


def relative_error(test: torch.Tensor, reference: torch.Tensor) -> float:
    """``||test - reference|| / ||reference||`` (Frobenius, float64); 0 when both are zero."""
    a = torch.as_tensor(test).detach().to("cpu", torch.float64)
    b = torch.as_tensor(reference).detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"tensors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    denom = float(torch.linalg.vector_norm(b))
    num = float(torch.linalg.vector_norm(a - b))
    if denom == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / denom


def latent_relative_error(test: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative error of the final latents: the error before the VAE can hide or amplify it."""
    return relative_error(test, reference)


def lpips_unavailable_reason(net: str = "alex") -> str | None:
    """None when LPIPS can load fully offline, else a one-line reason (checked without any network access)."""
    if net not in _LPIPS_BACKBONES:
        return f"LPIPS net {net!r} is not one of {', '.join(_LPIPS_BACKBONES)}"
    try:
        import torchvision.models as tvm
    except Exception:  # noqa: BLE001 - any import failure means "cannot run"
        return "LPIPS skipped: torchvision is not installed"
    arch, weights_name = _LPIPS_BACKBONES[net]
    weights = getattr(tvm, weights_name, None)
    url = getattr(getattr(weights, "DEFAULT", None), "url", None)
    if url is None:
        return f"LPIPS skipped: torchvision has no {weights_name}"
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not checkpoint.is_file():
        return f"LPIPS skipped: {arch} weights not in the local cache ({checkpoint}); no download attempted"
    try:
        from torchmetrics.functional.image import lpips as tm_lpips  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"LPIPS skipped: torchmetrics LPIPS unavailable ({exc})"
    return None


def load_lpips(net: str = "alex") -> Any:
    """The torchmetrics LPIPS module, loaded from local files only; raises :class:`LPIPSUnavailable`."""
    if net in _LPIPS_CACHE:
        return _LPIPS_CACHE[net]
    reason = lpips_unavailable_reason(net)
    if reason is not None:
        raise LPIPSUnavailable(reason)
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE",)}
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        metric = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True).eval()
    except Exception as exc:  # noqa: BLE001 - report, never crash the evaluation
        raise LPIPSUnavailable(f"LPIPS skipped: could not load offline ({exc})") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    _LPIPS_CACHE[net] = metric
    return metric


def lpips(test: Any, reference: Any, net: str = "alex") -> float:
    """Mean per-frame LPIPS (lower is closer); raises :class:`LPIPSUnavailable` when it cannot run offline."""
    metric = load_lpips(net)
    a, b = _pair(test, reference)
    with torch.no_grad():
        return float(metric(a.float().clamp(0, 1), b.float().clamp(0, 1)))


def compare_videos(
    test: Any,
    reference: Any,
    *,
    test_latents: torch.Tensor | None = None,
    reference_latents: torch.Tensor | None = None,
    use_lpips: bool = True,
) -> dict[str, Any]:
    """Every metric in one dict: psnr, ssim, lpips (None + ``lpips_skipped`` when unavailable), flicker_delta
    (test flicker minus reference flicker: positive means more frame-to-frame change), latent_rel_error."""
    result: dict[str, Any] = {
        "psnr": psnr(test, reference),
        "ssim": ssim(test, reference),
        "lpips": None,
        "flicker": temporal_flicker(test),
        "flicker_ref": temporal_flicker(reference),
    }
    result["flicker_delta"] = result["flicker"] - result["flicker_ref"]
    if use_lpips:
        try:
            result["lpips"] = lpips(test, reference)
        except LPIPSUnavailable as exc:
            result["lpips_skipped"] = str(exc)
    else:
        result["lpips_skipped"] = "LPIPS disabled"
    result["latent_rel_error"] = (
        latent_relative_error(test_latents, reference_latents)
        if test_latents is not None and reference_latents is not None
        else None
    )
    return result

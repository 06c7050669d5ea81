"""Metric functions against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dit_accel.eval import metrics


def test_psnr_by_hand():
    ref = np.zeros((2, 4, 4, 3))
    test = ref + 0.1  # mse = 0.01 -> 10 * log10(1 / 0.01) = 20 dB
    assert metrics.psnr(test, ref) == pytest.approx(20.0)
    # Per-frame average: frame 0 off by 0.1 (20 dB), frame 1 off by 0.01 (40 dB) -> mean 30 dB.
    test2 = ref.copy()
    test2[0] += 0.1
    test2[1] += 0.01
    assert metrics.psnr(test2, ref) == pytest.approx(30.0)
    assert metrics.psnr(ref, ref) == metrics.PSNR_IDENTICAL


def test_ssim_by_hand():
    # Constant images a = 0, b = 0.1: SSIM = C1 / (0.1^2 + C1) with C1 = (0.01 * 1)^2.
    a = np.zeros((1, 16, 16, 3))
    b = a + 0.1
    c1 = 0.01**2
    assert metrics.ssim(b, a) == pytest.approx(c1 / (0.01 + c1), rel=1e-4)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    # Channel-first input and tiny frames (window shrinks below 11) are accepted.
    small = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    assert metrics.ssim(small, small) == pytest.approx(1.0)


def test_flicker_and_relative_error_by_hand():
    frames = np.zeros((3, 2, 2, 3))
    frames[1] = 0.5  # |0.5 - 0| and |0 - 0.5| -> mean 0.5
    assert metrics.temporal_flicker(frames) == pytest.approx(0.5)
    assert metrics.temporal_flicker(frames[:1]) == 0.0
    a = torch.tensor([3.0, 4.0])
    b = torch.tensor([0.0, 0.0])
    assert metrics.relative_error(a + torch.tensor([0.0, 1.0]), a) == pytest.approx(1.0 / 5.0)
    assert metrics.latent_relative_error(b, b) == 0.0
    assert math.isinf(metrics.relative_error(a, b))
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.relative_error(a, torch.zeros(3))


def test_compare_videos_fields_and_lpips_never_downloads(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    ref = np.zeros((2, 8, 8, 3))
    test = ref.copy()
    test[1] = 0.2
    result = metrics.compare_videos(test, ref, test_latents=torch.ones(4), reference_latents=torch.ones(4))
    assert set(result) >= {"psnr", "ssim", "lpips", "flicker_delta", "latent_rel_error"}
    assert result["flicker_delta"] == pytest.approx(0.2)
    assert result["latent_rel_error"] == 0.0
    assert result["lpips"] is None and result["lpips_skipped"].startswith("LPIPS skipped")
    assert "\n" not in result["lpips_skipped"]

"""Image-quality metrics between an original and its protected copy (uint8 HxWx3 arrays)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def psnr(original: np.ndarray, protected: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images; ``inf`` when identical."""
    mse = float(np.mean((original.astype(np.float64) - protected.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / mse)


def _gaussian_kernel(size: int, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(original: np.ndarray, protected: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01,
    K2=0.03) on HxWx3 uint8 images, averaged over the three colour channels. Images smaller
    than the window use a window of their own size."""
    a = torch.from_numpy(np.ascontiguousarray(original)).permute(2, 0, 1).float()
    b = torch.from_numpy(np.ascontiguousarray(protected)).permute(2, 0, 1).float()
    size = min(11, a.shape[1], a.shape[2])
    g = _gaussian_kernel(size)
    # The Gaussian window is separable: blur rows, then columns (all maps batched together).
    maps = torch.stack([a, b, a * a, b * b, a * b]).reshape(-1, 1, *a.shape[1:])
    maps = F.conv2d(maps, g.view(1, 1, 1, size))
    maps = F.conv2d(maps, g.view(1, 1, size, 1))
    maps = maps.reshape(5, a.shape[0], *maps.shape[2:]).double()
    mu_a, mu_b, aa, bb, ab = maps
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())

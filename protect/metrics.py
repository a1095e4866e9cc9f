"""Image-quality metrics between an original and its protected copy (uint8 HxWx3 arrays), in
bounded memory and time whatever the photo's size:

- PSNR on every pixel, summed in bands of rows (exact);
- SSIM on the whole image up to :data:`SSIM_WHOLE_PIXELS` pixels; a larger image is measured
  at full resolution on :data:`SSIM_TILES` x :data:`SSIM_TILES` tiles of :data:`SSIM_TILE`
  pixels spread evenly over it (a whole-image SSIM of a 12-Mpixel photo costs gigabytes and
  tens of seconds). :data:`METHOD_NOTE` says so in every record.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

BAND_PIXELS = 1_000_000
SSIM_WHOLE_PIXELS = 1 << 20
SSIM_TILE = 256
SSIM_TILES = 4
METHOD_NOTE = (
    f"PSNR on every pixel; SSIM on the whole image up to {SSIM_WHOLE_PIXELS:,} pixels, for larger images the mean over "
    f"{SSIM_TILES * SSIM_TILES} tiles of {SSIM_TILE}x{SSIM_TILE} pixels spread over it, at full resolution"
)


def psnr(original: np.ndarray, protected: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for 8-bit images; ``inf`` when identical."""
    height, width = original.shape[:2]
    rows = max(1, BAND_PIXELS // max(width, 1))
    squared = 0
    for top in range(0, height, rows):
        diff = original[top : top + rows].astype(np.int32) - protected[top : top + rows].astype(np.int32)
        squared += int(np.square(diff, dtype=np.int64).sum())
    if squared == 0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / (squared / original.size))


def _gaussian_kernel(size: int, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(original: np.ndarray, protected: np.ndarray) -> float:
    """Structural similarity (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1=0.01,
    K2=0.03) on HxWx3 uint8 images, averaged over the three colour channels and every window
    position; on tiles of a large image (see the module). Images smaller than the window use
    a window of their own size."""
    height, width = original.shape[:2]
    size = min(11, height, width)
    if height * width <= SSIM_WHOLE_PIXELS:
        # Exact, in tiles that overlap by the window (small maps are much faster than one big one).
        step = SSIM_TILE - size + 1
        corners = [(top, left) for top in range(0, height - size + 1, step) for left in range(0, width - size + 1, step)]
        tile = SSIM_TILE
    else:
        tile = min(SSIM_TILE, height, width)
        tops = np.linspace(0, height - tile, SSIM_TILES).round().astype(int)
        lefts = np.linspace(0, width - tile, SSIM_TILES).round().astype(int)
        corners = [(int(top), int(left)) for top in tops for left in lefts]
    g = _gaussian_kernel(size)
    total, count = 0.0, 0
    for top, left in corners:
        crop = (slice(top, top + tile), slice(left, left + tile))
        a = torch.from_numpy(np.ascontiguousarray(original[crop])).permute(2, 0, 1).float()
        b = torch.from_numpy(np.ascontiguousarray(protected[crop])).permute(2, 0, 1).float()
        ssim_map = _ssim_map(a, b, g, size)
        total += float(ssim_map.sum())
        count += ssim_map.numel()
    return total / count


def _ssim_map(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor, size: int) -> torch.Tensor:
    """SSIM maps (valid window positions) of two float CxHxW images, one per channel."""
    # The Gaussian window is separable: blur rows, then columns, as one depthwise convolution
    # over the five maps of every channel (a grouped convolution is an order of magnitude faster
    # on CPU, and one call per tile instead of one per channel saves the per-call overhead that
    # dominates small images).
    groups = 5 * a.shape[0]
    maps = torch.cat([a, b, a * a, b * b, a * b])[None]
    maps = F.conv2d(maps, g.view(1, 1, 1, size).expand(groups, 1, 1, size).contiguous(), groups=groups)
    maps = F.conv2d(maps, g.view(1, 1, size, 1).expand(groups, 1, size, 1).contiguous(), groups=groups)[0].double()
    mu_a, mu_b, aa, bb, ab = maps.unflatten(0, (5, a.shape[0]))
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))

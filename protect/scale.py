"""Between an image's own size and the working resolution at which methods fit noise.

Images are read at the working resolution (area-averaged), noise is computed there, and the
noise is mapped back to each image's own size (bilinear). Every path that fits or applies noise
uses these two functions, so noise is fitted exactly as it is applied.
"""

from __future__ import annotations

import statistics
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from protect.images import LoadedImage


def working_tensor(image: LoadedImage, resolution: int) -> torch.Tensor:
    """uint8 (3, R, R): the image resized (area-averaged) to the working resolution."""
    small = Image.fromarray(image.rgb).resize((resolution, resolution), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1)


def to_image_size(delta: torch.Tensor, width: int, height: int) -> np.ndarray:
    """Map a (3, R, R) working-resolution perturbation to an (H, W, 3) array. Bilinear
    interpolation never leaves the range of its inputs, so the eps ball is kept."""
    if delta.shape[-2:] != (height, width):
        delta = F.interpolate(delta[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return delta.permute(1, 2, 0).numpy()


def median_shorter_side(sizes: Iterable[tuple[int, int]]) -> int | None:
    """The median of the images' shorter sides (pixels), from (width, height) pairs; None for none.
    What "photo-sized" means to the automatic working resolution and victim size."""
    sides = [min(width, height) for width, height in sizes]
    return int(statistics.median(sides)) if sides else None

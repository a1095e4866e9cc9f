"""``random``: the control every report compares with.

Independent uniform noise in [-eps, eps] per pixel (L-inf, eps 8/255 by default). It shows how
much accuracy a victim loses to *any* perturbation of this size; a method that protects must do
much better than this.
"""

from __future__ import annotations

import torch

from protect.generator import MethodConfig, StoredNoiseGenerator, register
from protect.progress import Reporter


@register("random")
class RandomNoise(StoredNoiseGenerator):
    config_class = MethodConfig
    summary = "Control: i.i.d. uniform noise in [-eps, eps] (the baseline every method must beat)."

    def fit(self, images: torch.Tensor, labels: torch.Tensor | None, reporter: Reporter | None = None) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        uniform = torch.rand(images.shape, generator=gen, dtype=torch.float32)
        self.noise = (uniform * 2 - 1) * self.config.eps

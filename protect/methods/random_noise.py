"""``random``: the control every report compares with.

Independent uniform noise in [-eps, eps] per pixel (L-inf, eps 8/255 by default). It shows how
much accuracy a victim loses to *any* perturbation of this size; a method that protects must do
much better than this.
"""

from __future__ import annotations

import torch

from protect.generator import Batch, Generator, MethodConfig, register
from protect.progress import Reporter


@register("random")
class RandomNoise(Generator):
    config_class = MethodConfig
    summary = "Control: i.i.d. uniform noise in [-eps, eps] (the baseline every method must beat)."

    def __init__(self, config: MethodConfig, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__(config, device=device, seed=seed)
        self.noise: torch.Tensor | None = None

    def fit(self, images: torch.Tensor, labels: torch.Tensor | None, reporter: Reporter | None = None) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        uniform = torch.rand(images.shape, generator=gen, dtype=torch.float32)
        self.noise = (uniform * 2 - 1) * self.config.eps

    def perturb(self, batch: Batch) -> torch.Tensor:
        if self.noise is None:
            raise RuntimeError("random: call fit() (or load_state_dict()) before perturb()")
        return self.noise[batch.indices.cpu()].to(batch.images.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.noise is None else {"noise": self.noise}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.noise = state["noise"].float()

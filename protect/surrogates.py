"""Surrogate training for methods that optimise noise against a classifier (error-minimising
noise, Bayes-error maximisation): their shared settings, the surrogate they train, one SGD step
and a few epochs of training. The networks themselves are in :mod:`protect.models`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from protect.generator import MethodConfig
from protect.models import build_classifier
from protect.ranks import SINGLE_PROCESS, Ranks

#: classifiers of :mod:`protect.models` a method can optimise its noise against
SURROGATES = ("small-cnn", "resnet18")


@dataclass
class SurrogateMethodConfig(MethodConfig):
    """Settings of methods that optimise noise against a surrogate classifier.

    surrogate: ``small-cnn`` (CPU default) or ``resnet18``.
    lr / momentum / weight_decay: surrogate SGD settings.
    pseudo_label_k: clusters used as labels when the input folder has none.
    """

    surrogate: str = "small-cnn"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    pseudo_label_k: int = 10

    def validate(self) -> None:
        super().validate()
        if self.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {', '.join(SURROGATES)}; got {self.surrogate!r}")
        if self.pseudo_label_k < 2:
            raise ValueError(f"pseudo_label_k must be at least 2; got {self.pseudo_label_k}")

    def sgd(self, model: nn.Module) -> torch.optim.SGD:
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def build_surrogate(name: str, num_classes: int, *, device: torch.device | str = "cpu", seed: int = 0) -> nn.Module:
    """A freshly initialised surrogate (deterministic for ``seed``), channels_last on ``device``."""
    if name not in SURROGATES:
        raise ValueError(f"unknown surrogate {name!r}; available: {', '.join(SURROGATES)}")
    return build_classifier(name, num_classes, seed=seed, device=device, channels_last=True)


def sgd_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
    autocast: torch.autocast, *, ranks: Ranks = SINGLE_PROCESS, share: float = 1.0,
) -> float:
    """One cross-entropy training step on a batch (images float in [0, 1]); returns the loss.

    In a data-parallel fit, ``images`` is this process's part of the batch, ``share`` its
    fraction of the batch, and the step taken is the whole batch's (see :class:`Ranks`)."""
    optimizer.zero_grad(set_to_none=True)
    loss = torch.zeros(())
    if len(images):
        with autocast:
            loss = F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), labels)
        loss.backward()
    ranks.sum_gradients(model, share)
    optimizer.step()
    ranks.average_buffers(model)
    return float(loss.detach())


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_for: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    n_images: int,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    autocast: torch.autocast,
    on_epoch: Callable[[], None] | None = None,
) -> None:
    """Train ``epochs`` shuffled epochs; ``batch_for(indices)`` returns (images, labels) on the
    model's device."""
    model.train().requires_grad_(True)
    for _ in range(epochs):
        for idx in torch.randperm(n_images, generator=generator).split(batch_size):
            sgd_step(model, optimizer, *batch_for(idx), autocast)
        if on_epoch is not None:
            on_epoch()

"""Surrogate classifiers used to optimise noise (and, from ``attacks``, as victims).

Both take float images in [0, 1] and normalise inside, so perturbations live in pixel space.
- ``small-cnn``: an airbench-style fast CNN (conv-pool-BN-GELU groups, widths 32/64/64 by
  default); about 30x faster than ResNet-18 on CPU, the default surrogate there.
- ``resnet18``: CIFAR ResNet-18 (3x3 stem, no max-pool; He et al. 2016 as used by
  Huang et al. 2021, the official EM surrogate).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from protect.distributed import SINGLE_PROCESS, Ranks
from protect.generator import MethodConfig

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]


class ConvGroup(nn.Sequential):
    """conv -> max-pool /2 -> BN -> GELU -> conv -> BN -> GELU (the airbench block)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(c_out),
            nn.GELU(),
            *_conv_bn(c_out, c_out),
        )


class SmallCNN(nn.Module):
    """Fast CNN for small images: stem conv, three ConvGroups (each halves the size), global
    max-pool, linear head. Works at any input size >= 8 px."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 64)) -> None:
        super().__init__()
        stem = max(widths[0] // 2, 16)
        self.normalize = Normalize()
        self.features = nn.Sequential(
            *_conv_bn(3, stem),
            ConvGroup(stem, widths[0]),
            ConvGroup(widths[0], widths[1]),
            ConvGroup(widths[1], widths[2]),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.feature_dim = widths[2]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem without max-pool, stages of 64/128/256/512 channels."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize()
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
        c_in = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)
        self.feature_dim = 512

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


SURROGATES: dict[str, Callable[[int], nn.Module]] = {
    "small-cnn": SmallCNN,
    "resnet18": ResNet18,
}


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SURROGATES[name](num_classes)
    return model.to(device=device, memory_format=torch.channels_last)


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

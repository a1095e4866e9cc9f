"""Victim architectures by name, sized for small inputs (CIFAR-like 32 px by default).

The surrogates of ``protect`` double as victims; VGG-11 and a small ViT add architectural
variety, since unlearnable noise crafted on one network must transfer to others.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from protect.surrogates import Normalize, ResNet18, SmallCNN


class VGG11(nn.Module):
    """VGG-11 with batch norm (Simonyan & Zisserman 2015), CIFAR variant: global pooling and a
    single linear classifier, so it works at any input size >= 32 px."""

    CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [Normalize()]
        c_in = 3
        for item in self.CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, item, 3, padding=1, bias=False), nn.BatchNorm2d(item), nn.ReLU()]
                c_in = item
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallViT(nn.Module):
    """A small Vision Transformer (Dosovitskiy et al. 2021) for 32 px inputs: 4x4 patches,
    width 192, 6 pre-norm blocks of 3 heads, mean-pooled tokens."""

    def __init__(self, num_classes: int = 10, image_size: int = 32, patch: int = 4, dim: int = 192,
                 depth: int = 6, heads: int = 3) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.patchify = nn.Conv2d(3, dim, patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patchify(self.normalize(x)).flatten(2).transpose(1, 2)
        if tokens.shape[1] != self.position.shape[1]:
            raise ValueError(f"SmallViT was built for {self.position.shape[1]} patches, got {tokens.shape[1]}")
        tokens = self.encoder(tokens + self.position)
        return self.head(self.norm(tokens).mean(dim=1))


VICTIMS: dict[str, Callable[..., nn.Module]] = {
    "small-cnn": lambda num_classes, image_size: SmallCNN(num_classes),
    "resnet18": lambda num_classes, image_size: ResNet18(num_classes),
    "vgg11": lambda num_classes, image_size: VGG11(num_classes),
    "vit-small": lambda num_classes, image_size: SmallViT(num_classes, image_size=image_size),
}

# Learning rates for the shared one-cycle SGD loop (transformers need a smaller step).
VICTIM_LR = {"small-cnn": 0.2, "resnet18": 0.1, "vgg11": 0.05, "vit-small": 0.02}


def build_victim(name: str, num_classes: int, *, seed: int = 0, image_size: int = 32) -> nn.Module:
    """A freshly initialised victim, deterministic for ``seed``."""
    if name not in VICTIMS:
        raise ValueError(f"unknown victim {name!r}; available: {', '.join(VICTIMS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VICTIMS[name](num_classes, image_size)

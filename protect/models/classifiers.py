"""Image classifiers by name: one registry and one factory for surrogates and victims alike.

Every model takes float images in [0, 1] and normalises inside (CIFAR-10 mean/std), so
perturbations live in pixel space, and exposes ``head`` (the classifier layer); the CNNs also
expose ``embed`` (penultimate features).

- ``small-cnn``: an airbench-style fast CNN (conv-pool-BN-GELU groups, widths 32/64/64 by
  default); about 30x faster than ResNet-18 on CPU, the default surrogate there.
- ``resnet18``: CIFAR ResNet-18 (3x3 stem, no max-pool; He et al. 2016 as used by
  Huang et al. 2021, the official EM surrogate).
- ``vgg11``: VGG-11 with batch norm (Simonyan & Zisserman 2015), CIFAR variant.
- ``vit-small``: a small Vision Transformer (Dosovitskiy et al. 2021): an 8 x 8 grid of
  patches at any input size (4 px patches at 32 px, 14 px at 112 px).
- ``resnet18-imagenet``: torchvision's ResNet-18 (7x7 stride-2 stem and max-pool, He et al.
  2016 as trained on ImageNet), from scratch: the victim for photos at 112 or 224 px.

Unlearnable noise crafted on one network must transfer to others, so victims span these
architectures.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

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
    """A small Vision Transformer (Dosovitskiy et al. 2021): an 8 x 8 grid of square patches
    (4 px at 32 px inputs), width 192, 6 pre-norm blocks of 3 heads, mean-pooled tokens."""

    def __init__(self, num_classes: int = 10, image_size: int = 32, patch: int | None = None, dim: int = 192,
                 depth: int = 6, heads: int = 3) -> None:
        super().__init__()
        patch = patch or max(1, image_size // 8)
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


class ImageNetResNet18(nn.Module):
    """torchvision's ResNet-18 (ImageNet layout: 7x7 stride-2 stem, max-pool, stages of
    64/128/256/512 channels, global average pool), randomly initialised; for photos at 112 px
    and more (at 32 px its stem leaves a 1x1 map before the last stage)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize()
        body = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        self.head = body.fc
        body.fc = nn.Identity()
        self.features = body
        self.feature_dim = 512

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


CLASSIFIERS: dict[str, Callable[[int, int], nn.Module]] = {
    "small-cnn": lambda num_classes, image_size: SmallCNN(num_classes),
    "resnet18": lambda num_classes, image_size: ResNet18(num_classes),
    "vgg11": lambda num_classes, image_size: VGG11(num_classes),
    "vit-small": lambda num_classes, image_size: SmallViT(num_classes, image_size=image_size),
    "resnet18-imagenet": lambda num_classes, image_size: ImageNetResNet18(num_classes),
}


def build_classifier(
    name: str,
    num_classes: int,
    *,
    seed: int = 0,
    image_size: int = 32,
    device: torch.device | str | None = None,
    channels_last: bool = False,
) -> nn.Module:
    """A freshly initialised classifier, deterministic for ``seed`` (the global RNG is left as
    it was). ``device`` and ``channels_last`` move it (surrogates train in channels_last, which
    is what makes bf16 convolutions fast on CPU); ``image_size`` matters to ``vit-small`` only."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(CLASSIFIERS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLASSIFIERS[name](num_classes, image_size)
    if device is not None or channels_last:
        model = model.to(device=device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    return model

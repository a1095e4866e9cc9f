"""Victim architectures by name. The surrogates of ``protect`` double as victims."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from protect.surrogates import ResNet18, SmallCNN

VICTIMS: dict[str, Callable[[int], nn.Module]] = {
    "small-cnn": SmallCNN,
    "resnet18": ResNet18,
}


def build_victim(name: str, num_classes: int, *, seed: int = 0) -> nn.Module:
    if name not in VICTIMS:
        raise ValueError(f"unknown victim {name!r}; available: {', '.join(VICTIMS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VICTIMS[name](num_classes)

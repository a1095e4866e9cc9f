"""Countermeasures an attacker uses against unlearnable data, each a registry entry.

The trainer knows two hooks only:
- a *data transform* applied once to the uint8 training images (JPEG, grayscale, ...);
- a *batch loss* computing the training loss of one batch (cutout, mixup, adversarial training, ...).
A countermeasure supplies either or both; settings are plain keyword arguments (data, not code).
Clean/protected mixing is a property of the training set and handled by the verify runner.
"""

from __future__ import annotations

import inspect
import io
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from attacks import purify
from protect.budget import project_linf, signed_gradient_step

DataTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def standard_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return F.cross_entropy(model(x).float(), y)


@dataclass
class Countermeasure:
    """A named countermeasure: optional one-off data transform and optional batch loss."""

    name: str
    description: str
    data_transform: DataTransform | None = None
    batch_loss: BatchLoss | None = None
    settings: dict[str, Any] = field(default_factory=dict)


# --- data transforms (uint8 (N,3,H,W) in, uint8 out) -------------------------------------

def jpeg(quality: int = 10) -> DataTransform:
    """Re-encode every image as JPEG (quality 10: the ISS setting, Liu et al. ICML 2023)."""

    def transform(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        out = torch.empty_like(images)
        for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
            buffer = io.BytesIO()
            Image.fromarray(img).save(buffer, format="JPEG", quality=quality)
            buffer.seek(0)
            out[i] = torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB")).copy()).permute(2, 0, 1)
        return out

    return transform


def grayscale() -> DataTransform:
    """ITU-R 601 luma replicated to three channels (ISS-G, Liu et al. ICML 2023)."""

    def transform(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        luma = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255)
        return luma.expand_as(images).to(torch.uint8).contiguous()

    return transform


def bit_depth(bits: int = 2) -> DataTransform:
    """Quantise each channel to ``bits`` bits (bit-depth reduction, Xu et al. NDSS 2018)."""

    def transform(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        levels = 2**bits - 1
        return (images.float() / 255 * levels).round().div(levels).mul(255).round().to(torch.uint8)

    return transform


def gaussian_blur(kernel_size: int = 3, sigma: float = 1.0) -> DataTransform:
    """Gaussian low-pass filter over every image."""

    def transform(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        coords = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
        g = torch.exp(-(coords**2) / (2 * sigma**2))
        g = (g / g.sum()).to(torch.float32)
        x = images.float()
        pad = kernel_size // 2
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        c = x.shape[1]
        x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
        x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)
        return x.round().clamp(0, 255).to(torch.uint8)

    return transform


# --- batch losses (float (N,3,H,W) in [0,1]) ---------------------------------------------

def _beta(alpha: float, gen: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw taken from ``gen``, so runs are reproducible for a seed."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _box_masks(n: int, h: int, w: int, size_h: torch.Tensor, size_w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample boolean boxes (N,1,H,W) centred uniformly at random, clipped at borders."""
    cy = torch.randint(0, h, (n,), generator=gen)
    cx = torch.randint(0, w, (n,), generator=gen)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    y0, y1 = (cy - size_h // 2).view(n, 1, 1), (cy + (size_h + 1) // 2).view(n, 1, 1)
    x0, x1 = (cx - size_w // 2).view(n, 1, 1), (cx + (size_w + 1) // 2).view(n, 1, 1)
    return ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).unsqueeze(1)


def cutout(fraction: float = 0.5) -> BatchLoss:
    """Zero one square of side ``fraction`` x image size per sample (DeVries & Taylor 2017:
    16 px on 32 px CIFAR)."""

    def loss(model, x, y, gen):
        n, _, h, w = x.shape
        side = torch.full((n,), max(1, round(fraction * h)))
        mask = _box_masks(n, h, w, side, side, gen).to(x.device)
        return standard_loss(model, x.masked_fill(mask, 0.0), y, gen)

    return loss


def mixup(alpha: float = 1.0) -> BatchLoss:
    """Convex combination of pairs of images and their labels (Zhang et al. ICLR 2018)."""

    def loss(model, x, y, gen):
        lam = _beta(alpha, gen) if alpha > 0 else 1.0
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        logits = model(lam * x + (1 - lam) * x[perm]).float()
        return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])

    return loss


def cutmix(alpha: float = 1.0) -> BatchLoss:
    """Paste a random box from another image; labels mixed by area (Yun et al. ICCV 2019)."""

    def loss(model, x, y, gen):
        n, _, h, w = x.shape
        lam = _beta(alpha, gen)
        side_h = torch.full((n,), round(h * (1 - lam) ** 0.5))
        side_w = torch.full((n,), round(w * (1 - lam) ** 0.5))
        mask = _box_masks(n, h, w, side_h, side_w, gen).to(x.device)
        perm = torch.randperm(n, generator=gen).to(x.device)
        mixed = torch.where(mask, x[perm], x)
        kept = 1 - mask.float().mean(dim=(1, 2, 3))
        logits = model(mixed).float()
        per_sample = kept * F.cross_entropy(logits, y, reduction="none") + (1 - kept) * F.cross_entropy(
            logits, y[perm], reduction="none"
        )
        return per_sample.mean()

    return loss


def adversarial_training(eps: float = 8 / 255, step_size: float = 2 / 255, steps: int = 5) -> BatchLoss:
    """PGD adversarial training (Madry et al. ICLR 2018): L-inf eps 8/255, step 2/255, 5 steps,
    random start; the model trains on the loss-maximising perturbation of each batch."""

    def loss(model, x, y, gen):
        was_training = model.training
        model.eval()
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * eps
        for _ in range(steps):
            delta.requires_grad_(True)
            attack_loss = F.cross_entropy(model((x + delta).clamp(0, 1)).float(), y)
            (grad,) = torch.autograd.grad(attack_loss, delta)
            delta = project_linf(signed_gradient_step(delta.detach(), grad, step_size, descend=False), eps)
        model.train(was_training)
        return standard_loss(model, (x + delta).clamp(0, 1).detach(), y, gen)

    return loss


def _strong_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample colour jitter, channel shuffle, random erasing and Gaussian noise (batched)."""
    n = x.shape[0]
    device = x.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(n, 1, 1, 1, generator=gen) * (high - low) + low).to(device)

    x = x * uniform(0.6, 1.4)  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * uniform(0.6, 1.4) + mean  # contrast
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * uniform(0.0, 1.6) + gray  # saturation
    perm = torch.stack([torch.randperm(3, generator=gen) for _ in range(n)]).to(device)
    x = x.gather(1, perm.view(n, 3, 1, 1).expand_as(x))  # channel shuffle
    side = torch.randint(x.shape[2] // 4, x.shape[2] // 2 + 1, (n,), generator=gen)
    mask = _box_masks(n, x.shape[2], x.shape[3], side, side, gen).to(device)
    x = torch.where(mask, torch.rand(x.shape, generator=gen).to(device), x)  # random erasing
    x = x + torch.randn(x.shape, generator=gen).to(device) * uniform(0.0, 0.1)  # noise
    return x.clamp(0, 1)


def ueraser_lite(copies: int = 5) -> BatchLoss:
    """UEraser-lite, after Qin et al. 2023 ("Learning the Unlearnable"): strong random
    augmentation, and the loss of each sample is the maximum over ``copies`` augmented copies."""

    def loss(model, x, y, gen):
        losses = torch.stack(
            [F.cross_entropy(model(_strong_augment(x, gen)).float(), y, reduction="none") for _ in range(copies)]
        )
        return losses.max(dim=0).values.mean()

    return loss


_FACTORIES: dict[str, tuple[str, Callable[..., Any], str]] = {
    "jpeg": ("data", jpeg, "JPEG re-encoding (quality 10)"),
    "grayscale": ("data", grayscale, "grayscale conversion"),
    "bit-depth": ("data", bit_depth, "bit-depth reduction (2 bits)"),
    "blur": ("data", gaussian_blur, "Gaussian blur (3x3, sigma 1)"),
    "cutout": ("batch", cutout, "cutout (one 16x16 hole at 32 px)"),
    "mixup": ("batch", mixup, "mixup (alpha 1)"),
    "cutmix": ("batch", cutmix, "cutmix (alpha 1)"),
    "adv-training": ("batch", adversarial_training, "PGD adversarial training (8/255, 2/255, 5 steps)"),
    # REM's radius (Fu et al., ICLR 2022: robust noise at 8/255 is built against adversaries up to 4/255)
    "adv-training-4": ("batch", lambda eps=4 / 255, step_size=1 / 255, steps=5: adversarial_training(eps, step_size, steps),
                       "PGD adversarial training (4/255, 1/255, 5 steps)"),
    "ueraser-lite": ("batch", ueraser_lite, "UEraser-lite: strong augmentation, max loss over 5 copies"),
    "diffusion-purify": ("data", purify.diffusion_purify, "diffusion purification (DDPM reverse process from t*)"),
}

COUNTERMEASURES = ("none", *_FACTORIES, "mix")


def label(name: str, settings: dict[str, Any] | None = None) -> str:
    """The countermeasure's name as a card shows it: with its radius where it has one, e.g.
    ``adv-training (8/255)``."""
    if name not in _FACTORIES:
        return name
    parameter = inspect.signature(_FACTORIES[name][1]).parameters.get("eps")
    if parameter is None:
        return name
    eps = (settings or {}).get("eps", parameter.default)
    return f"{name} ({eps * 255:.3g}/255)"


def row_name(name: str, settings: dict[str, Any]) -> str:
    """The name of a countermeasure's row on the card; a countermeasure run at several settings
    (diffusion purification at several t*) gets one row per setting."""
    return purify.row_name(settings) if name == "diffusion-purify" else name


def build_countermeasure(name: str, **settings: Any) -> Countermeasure:
    """The countermeasure ``name`` with optional settings overriding its defaults.

    ``none`` trains plainly; ``mix`` (clean fraction, handled by the runner) also trains plainly."""
    if name in ("none", "mix"):
        description = "no countermeasure" if name == "none" else f"{settings.get('clean_fraction', 0.5):.0%} clean data mixed in"
        return Countermeasure(name, description, settings=dict(settings))
    if name not in _FACTORIES:
        raise ValueError(f"unknown countermeasure {name!r}; available: {', '.join(COUNTERMEASURES)}")
    kind, factory, description = _FACTORIES[name]
    hook = factory(**settings)
    if kind == "data":
        return Countermeasure(name, description, data_transform=hook, settings=dict(settings))
    return Countermeasure(name, description, batch_loss=hook, settings=dict(settings))

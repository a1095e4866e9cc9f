"""One training loop for every victim (airbench-style: data as tensors, batched augmentation)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks.countermeasures import BatchLoss, DataTransform, standard_loss
from attacks.data import ImageSet
from protect.augment import random_crop_flip
from protect.precision import autocast, resolved_precision
from protect.training_state import load_training_state, save_training_state, tensor_fingerprint


# Learning rates of the victims of protect.models for the one-cycle SGD loop below (transformers
# need a smaller step).
VICTIM_LR = {"small-cnn": 0.2, "resnet18": 0.1, "vgg11": 0.05, "vit-small": 0.02, "resnet18-imagenet": 0.1}


#: training augmentations by name: random crop after 4-px reflect padding + flip (CIFAR-sized
#: images, protocol P0) and random-resized-crop + flip (photos, protocol P2)
AUGMENTATIONS = ("crop-flip", "resized-crop-flip", "none")


def augmentation_for(size: int) -> str:
    """The augmentation a victim trained at ``size`` px uses: padded crops for thumbnails,
    random-resized crops for photo sizes (64 px and more), as ImageNet training does."""
    return "resized-crop-flip" if size >= 64 else "crop-flip"


@dataclass
class TrainConfig:
    """SGD with Nesterov momentum and a one-cycle schedule (protocol P0 victim settings)."""

    epochs: int = 15
    batch_size: int = 512
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: str = "crop-flip"  # one of AUGMENTATIONS
    precision: str = "auto"  # protect.precision: auto = bf16 where the hardware runs it fast

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augment!r}; choose one of {', '.join(AUGMENTATIONS)}")


@dataclass
class TrainResult:
    test_accuracy: list[float] = field(default_factory=list)  # after each epoch, in [0, 1]
    seconds: float = 0.0  # training and evaluation, including epochs trained before a resume
    resumed_from_epoch: int = 0  # epochs restored from a checkpoint
    resumed_seconds: float = 0.0  # the time those epochs took
    precision: list[str] = field(default_factory=list)  # per epoch, "bf16" or "fp32": a resumed run may mix them

    @property
    def final(self) -> float:
        return self.test_accuracy[-1]

    @property
    def peak(self) -> float:
        return max(self.test_accuracy)


def random_resized_crop_flip(
    x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Per-sample random-resized crop (area fraction in ``scale``, aspect ratio in ``ratio``,
    resized back to the input size, bilinear) and random horizontal flip, on a batch
    x: float (N, C, H, W). One affine resampling per batch, no per-sample Python."""
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    area = uniform(*scale)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    width = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the image side
    height = (area / aspect).sqrt().clamp(max=1.0)
    centre_x = (uniform(-1, 1) * (1 - width)).to(x.dtype)
    centre_y = (uniform(-1, 1) * (1 - height)).to(x.dtype)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


AUGMENT = {"crop-flip": random_crop_flip, "resized-crop-flip": random_resized_crop_flip, "none": None}


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, *, device: torch.device, precision: str = "auto", batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1]."""
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = data.images[start : start + batch_size].to(device).float().div(255)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            pred = model(x).argmax(1)
        correct += int((pred.cpu() == data.labels[start : start + batch_size]).sum())
    return correct / len(data)


def train_classifier(
    model: nn.Module,
    train: ImageSet,
    test: ImageSet,
    config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    data_transform: DataTransform | None = None,
    batch_loss: BatchLoss | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    checkpoint: Path | None = None,
) -> TrainResult:
    """Train ``model`` on ``train`` and record clean test accuracy after every epoch.

    data_transform: applied once to the uint8 training images before training.
    batch_loss: computes the loss of an augmented batch (default: cross-entropy).
    on_epoch: called with (epoch index, test accuracy) after each epoch, restored ones included.
    checkpoint: a path stem (protect.training_state); the state after each epoch is saved
    there, and a run with the same data, config and seed resumes from it. The caller deletes
    it once the result is stored. Resumed on a machine where ``precision: auto`` resolves
    differently, the remaining epochs use that machine's precision; ``precision`` in the result
    says which each epoch used.
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    train_images = data_transform(train.images, gen) if data_transform is not None else train.images
    batch_loss = batch_loss or standard_loss
    model = model.to(device=device, memory_format=torch.channels_last)
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=True,
    )
    steps_per_epoch = -(-len(train) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.25,
        anneal_strategy="linear", cycle_momentum=False,
    )
    result = TrainResult()
    record = None
    if checkpoint is not None:
        identity = {"config": asdict(config), "seed": seed, "train": tensor_fingerprint(train_images, train.labels),
                    "test": tensor_fingerprint(test.images, test.labels)}
        record = load_training_state(checkpoint, model, optimizer, schedule, gen, identity)
    if record is not None:
        result.test_accuracy = record["test_accuracy"]
        result.precision = record.get("precision", ["unrecorded"] * len(result.test_accuracy))
        result.resumed_from_epoch, result.resumed_seconds = len(result.test_accuracy), record["seconds"]
        if on_epoch is not None:
            for epoch, accuracy in enumerate(result.test_accuracy):
                on_epoch(epoch, accuracy)
    started = time.perf_counter() - result.resumed_seconds
    precision = resolved_precision(device, config.precision)
    for epoch in range(result.resumed_from_epoch, config.epochs):
        model.train()
        for idx in torch.randperm(len(train), generator=gen).split(config.batch_size):
            x = train_images[idx].to(device).float().div(255)
            y = train.labels[idx].to(device)
            if AUGMENT[config.augment] is not None:
                x = AUGMENT[config.augment](x, gen)
            x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, config.precision):
                loss = batch_loss(model, x, y, gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        accuracy = evaluate(model, test, device=device, precision=config.precision)
        result.test_accuracy.append(accuracy)
        result.precision.append(precision)
        if checkpoint is not None and epoch + 1 < config.epochs:
            record = {"identity": identity, "step": (epoch + 1) * steps_per_epoch,
                      "test_accuracy": result.test_accuracy, "precision": result.precision,
                      "seconds": time.perf_counter() - started}
            save_training_state(checkpoint, model, optimizer, schedule, gen, record)
        if on_epoch is not None:
            on_epoch(epoch, accuracy)
    result.seconds = time.perf_counter() - started
    return result

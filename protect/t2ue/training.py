"""Training a T2UE generator against a frozen CLIP surrogate.

G minimises the InfoNCE (CLIP) loss between f_I(x + G(f_T(t), z)) and f_T(t) (error-minimising
noise for contrastive learning), with Adam (decoupled weight decay), lr 1e-4 and a cosine
schedule. Training checkpoints (``checkpoint.safetensors`` + ``checkpoint.json``) are written
atomically after every epoch, so an interrupted training resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from protect.budget import check_eps
from protect.generator import MAX_RESOLUTION
from protect.models.clip import ClipEncoders, load_clip
from protect.precision import autocast, check_precision
from protect.progress import NullReporter, Reporter
from protect.t2ue.data import CLIP_TEMPLATES, TextImagePairs
from protect.t2ue.network import (
    GeneratorSpec,
    T2UEError,
    TextToNoiseGenerator,
    build_generator,
    embed_texts,
    save_generator,
    text_fingerprint,
)
from protect.training_state import CheckpointError, load_training_state, save_training_state

@dataclass
class T2UETrainConfig:
    """Generator training (defaults and their sources in ``configs/t2ue-train.yaml``).

    eps: L-inf budget (8/255). resolution: the noise and working image size. z_dim, width: the
    generator (4x4 x width first map). clip_model / clip_pretrained / clip_weights: the frozen
    CLIP surrogate and text encoder (open_clip name, weights tag, local weights file; ``random``
    for tests). epochs, batch_size, lr, weight_decay, min_lr: Adam with decoupled weight decay,
    cosine from lr to min_lr over all steps. templates: caption templates for labelled folders.
    bn_batches: batches used after training to recompute the batch-norm statistics used at
    protection time. precision: auto (bf16 autocast where the hardware runs it fast, see protect.precision), bf16 or fp32.
    """

    eps: float = 8 / 255
    resolution: int = 32
    z_dim: int = 100
    width: int = 512
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    clip_weights: str = ""
    epochs: int = 500
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 1e-4
    min_lr: float = 0.0
    templates: list[str] = field(default_factory=lambda: list(CLIP_TEMPLATES))
    bn_batches: int = 20
    precision: str = "auto"

    def validate(self) -> None:
        check_eps(self.eps)
        if not 4 <= self.resolution <= MAX_RESOLUTION or self.z_dim < 1 or self.width < 8:
            raise ValueError(f"resolution must be in 4..{MAX_RESOLUTION}, z_dim >= 1 and width >= 8")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("epochs must be >= 1 and batch_size >= 2 (InfoNCE needs negatives)")
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.bn_batches < 0:
            raise ValueError("lr must be positive; min_lr, weight_decay and bn_batches >= 0")
        if not self.templates or not all(isinstance(t, str) and "{}" in t for t in self.templates):
            raise ValueError("templates must be a non-empty list of strings, each with {} for the class name")
        check_precision(self.precision)


def infonce_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss over a batch of N pairs (open_clip's ClipLoss)."""
    from open_clip.loss import ClipLoss

    return ClipLoss()(F.normalize(image_features.float(), dim=-1), F.normalize(text_features.float(), dim=-1), logit_scale)


CHECKPOINT = "checkpoint"  # checkpoint.safetensors + checkpoint.json (protect.training_state)


def _data_fingerprint(pairs: TextImagePairs) -> str:
    digest = hashlib.sha256(pairs.images.numpy().tobytes())
    digest.update(json.dumps(pairs.texts).encode())
    digest.update(pairs.options.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class TrainSummary:
    """What :func:`train_generator` did: final path, per-epoch mean InfoNCE, seconds."""

    generator: Path
    epoch_losses: list[float]
    seconds: float
    resumed_from_epoch: int = 0
    clean_loss: float | None = None


def train_generator(
    pairs: TextImagePairs,
    config: T2UETrainConfig,
    out_dir: Path | str,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    reporter: Reporter | None = None,
    clip: ClipEncoders | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> TrainSummary:
    """Train G to minimise InfoNCE(f_I(x + G(f_T(t), z)), f_T(t)) against a frozen CLIP, then
    write ``out_dir/generator.safetensors`` and ``generator.yaml``.

    pairs: uint8 images (N, 3, R, R) at ``config.resolution`` with their captions. An earlier,
    interrupted training with the same data, config and seed in ``out_dir`` is resumed from its
    last finished epoch. ``clip`` (optional) is the already loaded surrogate.
    """
    reporter = reporter or NullReporter()
    device = torch.device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if pairs.images.shape[-1] != config.resolution:
        raise T2UEError(f"pairs are {pairs.images.shape[-1]} px but resolution is {config.resolution}")
    clip = clip or load_clip(config.clip_model, pretrained=config.clip_pretrained, weights=config.clip_weights or None,
                             device=device, option="clip_weights")
    if clip.weights == "random":
        reporter.message("t2ue: the CLIP surrogate is randomly initialised (clip_weights=random): for tests only", "warning")
    with reporter.phase("t2ue: embedding captions", total=None):
        text_features = embed_texts(clip, pairs.texts)
    spec = GeneratorSpec(config.resolution, text_features.shape[1], config.z_dim, config.width, config.clip_model, config.clip_pretrained)
    net = build_generator(spec, seed).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(pairs) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch, eta_min=config.min_lr)
    rng = torch.Generator().manual_seed(seed)
    identity = {"config": dataclasses.asdict(config), "seed": seed, "data": _data_fingerprint(pairs)}
    meta: dict[str, Any] = {"identity": identity, "epoch": 0, "step": 0, "epoch_losses": [], "seconds": 0.0}
    start_epoch = _resume(out_dir, net, optimizer, schedule, rng, meta, reporter)
    logit_scale = clip.model.logit_scale.exp().detach().clamp(max=100).float()
    started = time.perf_counter() - meta["seconds"]
    with reporter.phase("t2ue: training the generator", total=config.epochs) as phase:
        phase.advance(start_epoch)
        for epoch in range(start_epoch, config.epochs):
            total, count = 0.0, 0
            for idx in torch.randperm(len(pairs), generator=rng).split(config.batch_size):
                if len(idx) < 2:
                    continue  # InfoNCE needs at least one negative
                loss = _train_step(net, clip, pairs, text_features, idx, rng, config, logit_scale, optimizer, device)
                schedule.step()
                total, count = total + loss * len(idx), count + len(idx)
                meta["step"] += 1
            meta["epoch_losses"].append(total / max(count, 1))
            meta["epoch"], meta["seconds"] = epoch + 1, time.perf_counter() - started
            save_training_state(out_dir / CHECKPOINT, net, optimizer, schedule, rng, meta)
            if on_epoch is not None:
                on_epoch(epoch, meta["epoch_losses"][-1])
            phase.describe(f"t2ue: training the generator, InfoNCE {meta['epoch_losses'][-1]:.4f}")
            phase.advance()
    _recompute_batch_norm(net, pairs, text_features, rng, config, device)
    facts = {
        "trained_on": {"source": pairs.source, "pairs": len(pairs), "captions": len(pairs.texts), "data": identity["data"]},
        "training": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("clip_weights",)},
        "clip_weights": Path(clip.weights).name if clip.weights != "random" else "random",
        "seed": seed,
        "epoch_losses": [round(v, 5) for v in meta["epoch_losses"]],
        "seconds": round(time.perf_counter() - started, 2),
    }
    path = save_generator(out_dir / "generator", net.eval(), config.eps, text_fingerprint(clip), facts)
    return TrainSummary(path, meta["epoch_losses"], facts["seconds"], start_epoch)


def _resume(
    out_dir: Path, net: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any, rng: torch.Generator,
    meta: dict[str, Any], reporter: Reporter,
) -> int:
    """Load the checkpoint in ``out_dir`` if there is one for the same data, config and seed
    (``meta["identity"]``); return the first epoch still to train."""
    try:
        saved = load_training_state(out_dir / CHECKPOINT, net, optimizer, schedule, rng, meta["identity"])
    except CheckpointError as error:
        raise T2UEError(str(error)) from error
    if saved is None:
        return 0
    meta.update({k: saved[k] for k in ("epoch", "step", "epoch_losses", "seconds")})
    reporter.message(f"t2ue: resuming from the checkpoint in {out_dir} (epoch {saved['epoch']})")
    return int(saved["epoch"])


def _draw(pairs: TextImagePairs, idx: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """One caption per image of the batch, chosen among its options."""
    column = torch.randint(0, pairs.options.shape[1], (len(idx),), generator=rng)
    return pairs.options[idx, column]


def _train_step(
    net: TextToNoiseGenerator, clip: ClipEncoders, pairs: TextImagePairs, text_features: torch.Tensor, idx: torch.Tensor,
    rng: torch.Generator, config: T2UETrainConfig, logit_scale: torch.Tensor, optimizer: torch.optim.Optimizer, device: torch.device,
) -> float:
    texts = text_features[_draw(pairs, idx, rng)].to(device)
    z = torch.randn((len(idx), config.z_dim), generator=rng).to(device)
    clean = pairs.images[idx].to(device).float().div(255)
    with autocast(device, config.precision):
        delta = net.perturbation(texts, z, config.eps)
        image_features = clip.encode_image((clean + delta).clamp(0, 1))
    loss = infonce_loss(image_features, texts, logit_scale.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def _recompute_batch_norm(
    net: TextToNoiseGenerator, pairs: TextImagePairs, text_features: torch.Tensor, rng: torch.Generator,
    config: T2UETrainConfig, device: torch.device,
) -> None:
    """Replace the running batch-norm statistics by exact averages over ``bn_batches`` training
    batches of the final weights: protection runs in eval mode (one caption at a time gives the
    same noise as in a batch), and the moving averages lag behind the weights they were
    collected under."""
    if config.bn_batches == 0:
        return
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    net.train()
    order = torch.randperm(len(pairs), generator=rng)
    for batch, idx in enumerate(order.split(config.batch_size)):
        if batch >= config.bn_batches:
            break
        z = torch.randn((len(idx), config.z_dim), generator=rng).to(device)
        net(text_features[_draw(pairs, idx, rng)].to(device), z)
    for norm in norms:
        norm.momentum = 0.1
    net.eval()


@torch.no_grad()
def infonce_of(
    generator: TextToNoiseGenerator, clip: ClipEncoders, pairs: TextImagePairs, eps: float, *, seed: int = 0, batch_size: int = 128,
    with_noise: bool = True,
) -> float:
    """Mean InfoNCE of the surrogate on ``pairs`` (first caption option of each image), with the
    generator's noise (eval mode) or without (``with_noise=False``): how well the noise makes
    image and text agree."""
    rng = torch.Generator().manual_seed(seed)
    features = embed_texts(clip, pairs.texts)
    device = next(generator.parameters()).device
    logit_scale = clip.model.logit_scale.exp().clamp(max=100).float()
    total, count = 0.0, 0
    for idx in torch.randperm(len(pairs), generator=rng).split(batch_size):
        if len(idx) < 2:
            continue
        texts = features[pairs.options[idx, 0]].to(device)
        x = pairs.images[idx].to(device).float().div(255)
        if with_noise:
            z = torch.randn((len(idx), generator.spec.z_dim), generator=rng).to(device)
            x = (x + generator.eval().perturbation(texts, z, eps)).clamp(0, 1)
        total += float(infonce_loss(clip.encode_image(x), texts, logit_scale)) * len(idx)
        count += len(idx)
    return total / max(count, 1)

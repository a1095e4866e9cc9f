"""Training a T2UE generator: error-minimising noise for contrastive learning.

G minimises an InfoNCE (CLIP) loss between images carrying its noise, x + G(t, z), and their
captions t, with Adam (decoupled weight decay) and a cosine schedule. Whose loss (``learner``):

- ``frozen`` (the paper, Ma et al. arXiv:2508.03091 Sec. 3.3): a frozen CLIP surrogate's,
  InfoNCE(f_I(x + G(t, z)), f_T(t));
- ``bilevel`` (min-min, as error-minimising noise is made for classifiers: Huang et al., ICLR
  2021): a CLIP trained from scratch on the noisy pairs in turn with G (``learner_steps``
  updates of it, then one of G), so the noise is what a model trained on the protected pairs
  finds easiest to learn; the surrogate's text encoder still conditions G;
- ``frozen+bilevel``: the sum of both.

``augment`` applies a victim's augmentation (random crop with 4 px reflect padding scaled to the
size, horizontal flip) to the noisy images before they are encoded, so the noise survives it.
``codes``: ``random`` draws z ~ N(0, I) at every step (the paper); ``caption`` uses each
caption's own code, the one class-wise protection gives it.

Training checkpoints (``checkpoint.safetensors`` + ``checkpoint.json``) are written atomically
after every epoch, so an interrupted training resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from protect.augment import random_crop_flip
from protect.budget import check_eps
from protect.generator import MAX_RESOLUTION
from protect.models.clip import ClipEncoders, load_clip
from protect.precision import autocast, check_precision
from protect.progress import NullReporter, Reporter
from protect.t2ue.data import CLIP_TEMPLATES, TextImagePairs
from protect.t2ue.network import (
    BACKBONES,
    GeneratorSpec,
    NoiseGenerator,
    T2UEError,
    TextCondition,
    build_generator,
    code_for,
    encode_captions,
    save_generator,
    text_fingerprint,
)
from protect.training_state import CheckpointError, load_training_state, save_training_state

LEARNERS = ("frozen", "bilevel", "frozen+bilevel")
CODES = ("random", "caption")


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
    backbone: ``ssa`` (the paper's) or ``unet`` (diffusers' conditional UNet). learner,
    learner_model, learner_steps, learner_lr, augment, codes: see the module docstring
    (learner_model: open_clip name of the learner CLIP, empty = ``clip_model``).
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
    backbone: str = "ssa"
    learner: str = "frozen"
    learner_model: str = ""
    learner_steps: int = 1
    learner_lr: float = 5e-4
    augment: bool = False
    codes: str = "random"

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
        for key, value, choices in (("backbone", self.backbone, BACKBONES), ("learner", self.learner, LEARNERS),
                                    ("codes", self.codes, CODES)):
            if value not in choices:
                raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
        if self.learner_steps < 1 or self.learner_lr <= 0:
            raise ValueError("learner_steps must be >= 1 and learner_lr positive")


def infonce_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss over a batch of N pairs (open_clip's ClipLoss)."""
    from open_clip.loss import ClipLoss

    return ClipLoss()(F.normalize(image_features.float(), dim=-1), F.normalize(text_features.float(), dim=-1), logit_scale)


def shift_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A victim's augmentation on a batch, independently per image: reflect-pad by 1/8 of the
    size (4 px at 32), crop back at a random offset, and flip half of them horizontally.
    Differentiable in ``images`` (float (N, C, R, R))."""
    return random_crop_flip(images, generator, pad=max(1, images.shape[-2] // 8))


class Learner:
    """The CLIP of the bi-level loop: trained from scratch (seeded) on the noisy pairs with
    open_clip's recipe (AdamW, betas 0.9/0.98, eps 1e-6, weight decay 0.2 on matrices, logit
    scale clamped at 100)."""

    def __init__(self, model_name: str, texts: list[str], lr: float, seed: int, device: torch.device) -> None:
        self.clip = load_clip(model_name, weights="random", seed=seed, device=device)
        self.clip.model.requires_grad_(True)
        self.tokens = self.clip.tokenizer(texts)
        params = list(self.clip.model.parameters())
        self.param_groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.2, "lr": lr, "betas": (0.9, 0.98), "eps": 1e-6},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": lr, "betas": (0.9, 0.98), "eps": 1e-6},
        ]

    def loss(self, images: torch.Tensor, caption_index: torch.Tensor, precision: str, *, text_grad: bool) -> torch.Tensor:
        """Its InfoNCE on (images, captions ``caption_index`` into the training texts); each
        distinct caption of the batch is encoded once."""
        model = self.clip.model
        device = images.device
        distinct, inverse = caption_index.unique(return_inverse=True)
        with autocast(device, precision):
            image_features = self.clip.encode_image(images)
            with torch.set_grad_enabled(text_grad):
                text_features = model.encode_text(self.tokens[distinct].to(device))
        return infonce_loss(image_features, text_features[inverse.to(device)], model.logit_scale.exp())

    @torch.no_grad()
    def clamp_scale(self) -> None:
        self.clip.model.logit_scale.clamp_(0, math.log(100))


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
    """Train G to minimise the InfoNCE loss of ``config.learner`` on the noisy pairs (see the
    module docstring), then write ``out_dir/generator.safetensors`` and ``generator.yaml``.

    pairs: uint8 images (N, 3, R, R) at ``config.resolution`` with their captions. An earlier,
    interrupted training with the same data, config and seed in ``out_dir`` is resumed from its
    last finished epoch. ``clip`` (optional) is the already loaded surrogate, whose text encoder
    conditions G.
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
        texts = encode_captions(clip, pairs.texts, tokens=config.backbone == "unet")
    spec = GeneratorSpec(config.resolution, texts.pooled.shape[1], config.z_dim, config.width, config.clip_model,
                         config.clip_pretrained, config.backbone)
    net = build_generator(spec, seed).to(device).train()
    learner = None
    if config.learner != "frozen":
        learner = Learner(config.learner_model or config.clip_model, pairs.texts, config.learner_lr, seed + 1, device)
    trained = nn.ModuleDict({"generator": net, **({"learner": learner.clip.model} if learner else {})})
    optimizer = torch.optim.AdamW(
        [{"params": list(net.parameters()), "lr": config.lr, "weight_decay": config.weight_decay},
         *(learner.param_groups if learner else [])],
    )
    steps_per_epoch = -(-len(pairs) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch, eta_min=config.min_lr)
    rng = torch.Generator().manual_seed(seed)
    identity = {"config": dataclasses.asdict(config), "seed": seed, "data": _data_fingerprint(pairs)}
    meta: dict[str, Any] = {"identity": identity, "epoch": 0, "step": 0, "epoch_losses": [], "seconds": 0.0}
    start_epoch = _resume(out_dir, trained, optimizer, schedule, rng, meta, reporter)
    codes = torch.stack([code_for(text, seed, config.z_dim) for text in pairs.texts]) if config.codes == "caption" else None
    step = _Step(net, clip, learner, pairs, texts, codes, config, optimizer, rng, device)
    started = time.perf_counter() - meta["seconds"]
    with reporter.phase("t2ue: training the generator", total=config.epochs) as phase:
        phase.advance(start_epoch)
        for epoch in range(start_epoch, config.epochs):
            total, count = 0.0, 0
            for idx in torch.randperm(len(pairs), generator=rng).split(config.batch_size):
                if len(idx) < 2:
                    continue  # InfoNCE needs at least one negative
                loss = step(idx)
                schedule.step()
                total, count = total + loss * len(idx), count + len(idx)
                meta["step"] += 1
            meta["epoch_losses"].append(total / max(count, 1))
            meta["epoch"], meta["seconds"] = epoch + 1, time.perf_counter() - started
            save_training_state(out_dir / CHECKPOINT, trained, optimizer, schedule, rng, meta)
            if on_epoch is not None:
                on_epoch(epoch, meta["epoch_losses"][-1])
            phase.describe(f"t2ue: training the generator, InfoNCE {meta['epoch_losses'][-1]:.4f}")
            phase.advance()
    _recompute_batch_norm(step)
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


class _Step:
    """One training step on a batch: the learner's updates (bi-level), then G's."""

    def __init__(
        self, net: NoiseGenerator, clip: ClipEncoders, learner: Learner | None, pairs: TextImagePairs, texts: TextCondition,
        codes: torch.Tensor | None, config: T2UETrainConfig, optimizer: torch.optim.Optimizer, rng: torch.Generator,
        device: torch.device,
    ) -> None:
        self.net, self.clip, self.learner, self.pairs, self.texts, self.codes = net, clip, learner, pairs, texts, codes
        self.config, self.optimizer, self.rng, self.device = config, optimizer, rng, device
        self.logit_scale = clip.model.logit_scale.exp().detach().clamp(max=100).float().to(device)

    def draw(self, idx: torch.Tensor) -> tuple[torch.Tensor, TextCondition, torch.Tensor]:
        """Each image's caption (one of its options: an index into ``pairs.texts``), its encoding and its code."""
        column = torch.randint(0, self.pairs.options.shape[1], (len(idx),), generator=self.rng)
        caption = self.pairs.options[idx, column]
        z = self.codes[caption] if self.codes is not None else torch.randn((len(idx), self.config.z_dim), generator=self.rng)
        return caption, self.texts[caption].to(self.device), z.to(self.device)

    def noisy(self, clean: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        x = (clean + delta).clamp(0, 1)
        return shift_flip(x, self.rng) if self.config.augment else x

    def __call__(self, idx: torch.Tensor) -> float:
        config, learner = self.config, self.learner
        caption, text, z = self.draw(idx)
        clean = self.pairs.images[idx].to(self.device).float().div(255)
        if learner is not None:
            learner.clip.model.train()
            with torch.no_grad(), autocast(self.device, config.precision):
                delta = self.net.perturbation(text, z, config.eps)
            for _ in range(config.learner_steps):
                loss = learner.loss(self.noisy(clean, delta), caption, config.precision, text_grad=True)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                learner.clamp_scale()
        with autocast(self.device, config.precision):
            delta = self.net.perturbation(text, z, config.eps)
        x = self.noisy(clean, delta)
        loss = torch.zeros((), device=self.device)
        if config.learner != "bilevel":
            with autocast(self.device, config.precision):
                image_features = self.clip.encode_image(x)
            loss = loss + infonce_loss(image_features, text.pooled, self.logit_scale)
        if learner is not None:
            learner.clip.model.eval()
            loss = loss + learner.loss(x, caption, config.precision, text_grad=False)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if learner is not None:  # only G moves in this half of the step
            for param in learner.clip.model.parameters():
                param.grad = None
        self.optimizer.step()
        return float(loss.detach())


@torch.no_grad()
def _recompute_batch_norm(step: _Step) -> None:
    """Replace the running batch-norm statistics by exact averages over ``bn_batches`` training
    batches of the final weights: protection runs in eval mode (one caption at a time gives the
    same noise as in a batch), and the moving averages lag behind the weights they were
    collected under."""
    net, config = step.net, step.config
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    if config.bn_batches == 0 or not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    net.train()
    order = torch.randperm(len(step.pairs), generator=step.rng)
    for batch, idx in enumerate(order.split(config.batch_size)):
        if batch >= config.bn_batches:
            break
        _, text, z = step.draw(idx)
        net(text, z)
    for norm in norms:
        norm.momentum = 0.1
    net.eval()


@torch.no_grad()
def infonce_of(
    generator: NoiseGenerator, clip: ClipEncoders, pairs: TextImagePairs, eps: float, *, seed: int = 0, batch_size: int = 128,
    with_noise: bool = True,
) -> float:
    """Mean InfoNCE of the surrogate on ``pairs`` (first caption option of each image), with the
    generator's noise (eval mode) or without (``with_noise=False``): how well the noise makes
    image and text agree."""
    rng = torch.Generator().manual_seed(seed)
    texts = encode_captions(clip, pairs.texts, tokens=generator.uses_tokens)
    device = next(generator.parameters()).device
    logit_scale = clip.model.logit_scale.exp().clamp(max=100).float()
    total, count = 0.0, 0
    for idx in torch.randperm(len(pairs), generator=rng).split(batch_size):
        if len(idx) < 2:
            continue
        text = texts[pairs.options[idx, 0]].to(device)
        x = pairs.images[idx].to(device).float().div(255)
        if with_noise:
            z = torch.randn((len(idx), generator.spec.z_dim), generator=rng).to(device)
            x = (x + generator.eval().perturbation(text, z, eps)).clamp(0, 1)
        total += float(infonce_loss(clip.encode_image(x), text.pooled, logit_scale)) * len(idx)
        count += len(idx)
    return total / max(count, 1)

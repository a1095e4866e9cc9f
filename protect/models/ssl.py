"""A label-free image encoder trained by self-supervision (SimCLR), to serve as the feature
extractor of label-agnostic methods (the ``clusters`` surrogate) where no pretrained CLIP is at
hand.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (arXiv:2002.05709): two random views of every image (random resized
crop, horizontal flip, colour jitter, grayscale), an encoder f and a projection MLP g, and the
NT-Xent loss that pulls the two views of an image together against the other 2N - 2 views of
the batch. Labels are never read. The representation used downstream is f's output (the
projection is dropped), as SimCLR evaluates it and as the Unlearnable Clusters code hooks the
input of its surrogate's classifier.

The encoder is this project's small CNN (:class:`protect.models.classifiers.SmallCNN`, any size >= 8 px)
without its head. Augmentations run on whole uint8 batches with per-image random parameters
(crops through ``torchvision.ops.roi_align``), so training has no per-image Python.

A trained encoder is a folder with ``encoder.safetensors`` (weights) and ``encoder.json``
(architecture, training record and the SHA-256 of the weights file); :func:`load_encoder`
refuses a weights file whose digest differs from its record.
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
from safetensors.torch import load_file, save_file
from torchvision.ops import roi_align

from protect.config import build_config, read_default_config, read_yaml
from protect.images import write_text_atomic
from protect.models.classifiers import SmallCNN
from protect.precision import autocast, check_precision
from protect.progress import NullReporter, Reporter
from protect.training_state import CheckpointError, load_training_state, save_training_state, tensor_fingerprint

FORMAT = "protect-ssl-encoder/1"
WEIGHTS_NAME, RECORD_NAME, CHECKPOINT = "encoder.safetensors", "encoder.json", "checkpoint"
TRAIN_DEFAULTS = "surrogate-ssl.yaml"  # packaged with the other configs (protect.configs)
# ITU-R BT.601 luma, as torchvision's rgb_to_grayscale
_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


class SSLError(ValueError):
    """An encoder file or a training request is unusable; the message names the file and the fix."""


@dataclass
class SSLTrainConfig:
    """SimCLR training of a small-CNN encoder (defaults and their sources in
    ``configs/surrogate-ssl.yaml``).

    resolution: training image size (images are resized to it; the encoder resizes its inputs
    to it when used). widths: the three stage widths of the small CNN; the representation has
    ``widths[-1]`` dimensions. projection_dim: output of the projection MLP. temperature: NT-Xent
    temperature. epochs, batch_size, lr, momentum, weight_decay: SGD (Nesterov off), cosine to 0.
    crop_scale: smallest crop area fraction. jitter: colour-jitter strength s (brightness,
    contrast, saturation 0.8 s, hue 0.2 s), applied with probability jitter_p. grayscale_p:
    probability of a grayscale view. precision: auto, bf16 or fp32.
    """

    resolution: int = 32
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    projection_dim: int = 128
    temperature: float = 0.5
    epochs: int = 30
    batch_size: int = 512
    lr: float = 0.24
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_scale: float = 0.2
    jitter: float = 0.5
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    precision: str = "auto"

    def validate(self) -> None:
        if self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 pixels; got {self.resolution}")
        if len(self.widths) != 3 or not all(isinstance(w, int) and w >= 1 for w in self.widths):
            raise ValueError(f"widths must be three positive channel counts; got {self.widths}")
        if self.epochs < 1 or self.batch_size < 2 or self.projection_dim < 1:
            raise ValueError("epochs and projection_dim must be >= 1, batch_size >= 2 (NT-Xent needs negatives)")
        if self.temperature <= 0 or self.lr <= 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("temperature and lr must be positive, weight_decay >= 0, momentum in [0, 1)")
        if not 0 < self.crop_scale <= 1 or self.jitter < 0 or not 0 <= self.jitter_p <= 1 or not 0 <= self.grayscale_p <= 1:
            raise ValueError("crop_scale must be in (0, 1], jitter >= 0, jitter_p and grayscale_p in [0, 1]")
        check_precision(self.precision)


def train_config(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> SSLTrainConfig:
    """Defaults < configs/surrogate-ssl.yaml < ``config_file`` < ``overrides``."""
    layers = [read_default_config(TRAIN_DEFAULTS)]
    if config_file is not None:
        layers.append((str(config_file), read_yaml(config_file)))
    layers.append(("--set", overrides or {}))
    return build_config(SSLTrainConfig, *layers)


# The model ---------------------------------------------------------------------------------


class SSLEncoder(nn.Module):
    """The small-CNN encoder f and SimCLR's projection MLP g (Linear-ReLU-Linear).

    ``embed``: float (N, 3, H, W) in [0, 1] -> (N, widths[-1]) representation, inputs resized to
    ``resolution`` (bilinear, so gradients reach the pixels); ``forward``: the projection."""

    def __init__(self, widths: list[int] | tuple[int, int, int], projection_dim: int, resolution: int) -> None:
        super().__init__()
        self.backbone = SmallCNN(1, tuple(widths))
        self.backbone.head = nn.Identity()  # the representation is what the head would see
        dim = self.backbone.feature_dim
        self.projection = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, projection_dim))
        self.resolution = resolution
        self.feature_dim = dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.resolution, self.resolution):
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return self.backbone.embed(images.contiguous(memory_format=torch.channels_last))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projection(self.embed(images))


def build_encoder(config: SSLTrainConfig, seed: int = 0) -> SSLEncoder:
    """A freshly initialised encoder, deterministic for ``seed``, channels_last."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SSLEncoder(config.widths, config.projection_dim, config.resolution)
    return model.to(memory_format=torch.channels_last)


# Augmentation and loss ---------------------------------------------------------------------


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (high - low) + low


def _crop_boxes(n: int, size: int, min_scale: float, gen: torch.Generator) -> torch.Tensor:
    """Random-resized-crop boxes (N, 5) for roi_align: area fraction in [min_scale, 1], aspect
    ratio in [3/4, 4/3] (log-uniform), clipped to the image (torchvision's ranges)."""
    area = _uniform(n, min_scale, 1.0, gen) * size * size
    ratio = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), gen))
    width = torch.sqrt(area * ratio).clamp(1, size)
    height = torch.sqrt(area / ratio).clamp(1, size)
    left = torch.rand(n, generator=gen) * (size - width)
    top = torch.rand(n, generator=gen) * (size - height)
    return torch.stack([torch.arange(n, dtype=torch.float32), left, top, left + width, top + height], dim=1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    luma = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
    return (x * luma).sum(dim=1, keepdim=True)


def _colour_jitter(x: torch.Tensor, strength: float, p: float, gen: torch.Generator) -> torch.Tensor:
    """SimCLR's colour distortion with per-image factors: brightness, contrast, saturation in
    [1 - 0.8 s, 1 + 0.8 s], hue shift in [-0.2 s, 0.2 s] of a turn (a rotation of the YIQ
    chroma plane); each image jittered with probability p. x: float (N, 3, H, W) in [0, 1]."""
    n = len(x)
    on = (torch.rand(n, generator=gen) < p).float()
    spread = 0.8 * strength

    def factor() -> torch.Tensor:
        return (1 + on * _uniform(n, -spread, spread, gen)).view(n, 1, 1, 1).to(x.device)

    brightness, contrast, saturation = factor(), factor(), factor()
    angle = (on * _uniform(n, -0.2 * strength, 0.2 * strength, gen) * 2 * math.pi).to(x.device)
    x = (x * brightness).clamp(0, 1)
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean).clamp(0, 1)
    gray = _gray(x)
    x = ((x - gray) * saturation + gray).clamp(0, 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(n, 3, 3, device=x.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    matrix = _YIQ_TO_RGB.to(x.device) @ rotation @ _RGB_TO_YIQ.to(x.device)  # (N, 3, 3): hue rotation in RGB
    return torch.bmm(matrix, x.flatten(2)).view_as(x).clamp(0, 1)


def simclr_views(images: torch.Tensor, config: SSLTrainConfig, gen: torch.Generator) -> torch.Tensor:
    """One random SimCLR view of each image: uint8 or float (N, 3, H, W) -> float (N, 3, R, R)
    in [0, 1] at ``config.resolution``."""
    x = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    n, size = len(x), x.shape[-1]
    boxes = _crop_boxes(n, size, config.crop_scale, gen).to(x.device)
    x = roi_align(x, boxes, output_size=config.resolution, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    flip = (torch.rand(n, generator=gen) < 0.5).view(n, 1, 1, 1).to(x.device)
    x = torch.where(flip, x.flip(-1), x)
    x = _colour_jitter(x, config.jitter, config.jitter_p, gen)
    grayscale = (torch.rand(n, generator=gen) < config.grayscale_p).view(n, 1, 1, 1).to(x.device)
    return torch.where(grayscale, _gray(x).expand_as(x), x)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss: for each of the 2N projections, cross-entropy of picking its
    pair's other view among the 2N - 1 others by cosine similarity / temperature."""
    z = F.normalize(torch.cat([first, second]).float(), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    n = len(first)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, targets)


# Training ----------------------------------------------------------------------------------


@dataclass
class SSLTrainSummary:
    """What :func:`train_encoder` did: the weights file, mean loss of each epoch, seconds."""

    weights: Path
    epoch_losses: list[float]
    seconds: float
    resumed_from_epoch: int = 0


def train_encoder(
    images: torch.Tensor,
    config: SSLTrainConfig,
    out_dir: Path | str,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    reporter: Reporter | None = None,
    source: str = "",
    on_epoch: Callable[[int, float], None] | None = None,
) -> SSLTrainSummary:
    """Train an encoder by SimCLR on ``images`` (uint8 (N, 3, R, R), no labels) and write
    ``out_dir/encoder.safetensors`` + ``encoder.json``.

    After every epoch a checkpoint is written to ``out_dir``; an interrupted training with the
    same images, config and seed resumes from its last finished epoch."""
    reporter = reporter or NullReporter()
    device = torch.device(device)
    out_dir = Path(out_dir)
    if len(images) < 2:
        raise SSLError(f"self-supervised training needs at least 2 images; got {len(images)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_encoder(config, seed).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    batch_size = min(config.batch_size, len(images))
    steps_per_epoch = len(images) // batch_size  # drop the last partial batch: NT-Xent wants full batches
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs * steps_per_epoch)
    rng = torch.Generator().manual_seed(seed)
    identity = {"config": dataclasses.asdict(config), "seed": seed, "data": tensor_fingerprint(images)}
    meta: dict[str, Any] = {"identity": identity, "epoch": 0, "step": 0, "epoch_losses": [], "seconds": 0.0}
    try:
        saved = load_training_state(out_dir / CHECKPOINT, model, optimizer, schedule, rng, identity)
    except CheckpointError as error:
        raise SSLError(str(error)) from error
    if saved is not None:
        meta.update({k: saved[k] for k in ("epoch", "step", "epoch_losses", "seconds")})
        reporter.message(f"ssl: resuming from the checkpoint in {out_dir} (epoch {saved['epoch']} of {config.epochs})")
    start_epoch = int(meta["epoch"])
    started = time.perf_counter() - meta["seconds"]
    with reporter.phase("ssl: training the encoder (SimCLR)", total=config.epochs) as phase:
        phase.advance(start_epoch)
        for epoch in range(start_epoch, config.epochs):
            total = 0.0
            order = torch.randperm(len(images), generator=rng)[: steps_per_epoch * batch_size]
            for idx in order.split(batch_size):
                total += _train_step(model, optimizer, images[idx], config, rng, device)
                schedule.step()
                meta["step"] += 1
            meta["epoch_losses"].append(total / steps_per_epoch)
            meta["epoch"], meta["seconds"] = epoch + 1, time.perf_counter() - started
            save_training_state(out_dir / CHECKPOINT, model, optimizer, schedule, rng, meta)
            if on_epoch is not None:
                on_epoch(epoch, meta["epoch_losses"][-1])
            phase.describe(f"ssl: training the encoder (SimCLR), epoch {epoch + 1}/{config.epochs}, "
                           f"NT-Xent {meta['epoch_losses'][-1]:.4f}")
            phase.advance()
    facts = {
        "trained_on": {"source": source, "images": len(images), "data": identity["data"]},
        "seed": seed,
        "epoch_losses": [round(v, 5) for v in meta["epoch_losses"]],
        "seconds": round(time.perf_counter() - started, 2),
    }
    weights = save_encoder(out_dir, model, config, facts)
    return SSLTrainSummary(weights, meta["epoch_losses"], facts["seconds"], start_epoch)


def _train_step(
    model: SSLEncoder, optimizer: torch.optim.Optimizer, batch: torch.Tensor, config: SSLTrainConfig,
    rng: torch.Generator, device: torch.device,
) -> float:
    batch = batch.to(device)
    first, second = simclr_views(batch, config, rng), simclr_views(batch, config, rng)
    with autocast(device, config.precision):
        projections = model(torch.cat([first, second]))
    loss = nt_xent(*projections.float().chunk(2), config.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


# Saved encoders ----------------------------------------------------------------------------


def encoder_files(path: Path | str) -> tuple[Path, Path]:
    """(weights, record) of an encoder given its folder, its weights file or its record."""
    path = Path(path).expanduser()
    folder = path if path.is_dir() or not path.suffix else path.parent
    return folder / WEIGHTS_NAME, folder / RECORD_NAME


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_encoder(out_dir: Path | str, model: SSLEncoder, config: SSLTrainConfig, facts: dict[str, Any]) -> Path:
    """Write the weights, then the record naming their SHA-256 (each atomically): a listed
    encoder always has its weights, and changed weights are detected on load."""
    weights, record = encoder_files(Path(out_dir))
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    document = {
        "format": FORMAT,
        "method": "SimCLR (Chen et al., ICML 2020, arXiv:2002.05709)",
        "architecture": {"widths": list(config.widths), "projection_dim": config.projection_dim,
                         "resolution": config.resolution, "feature_dim": model.feature_dim},
        "training": dataclasses.asdict(config),
        "weights_sha256": _sha256(weights),
        **facts,
    }
    write_text_atomic(record, json.dumps(document, indent=2) + "\n")
    return weights


def read_encoder_record(path: Path | str) -> dict[str, Any]:
    """The record of a saved encoder; :class:`SSLError` naming the missing or wrong file."""
    weights, record = encoder_files(path)
    for needed in (weights, record):
        if not needed.is_file():
            raise SSLError(f"ssl encoder file not found: {needed}; make an encoder with `protect surrogate ssl "
                           "IMAGES_DIR OUT_DIR` and pass OUT_DIR/encoder.safetensors with --set surrogate_weights=PATH")
    try:
        document = json.loads(record.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SSLError(f"{record}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise SSLError(f"{record} is not an ssl encoder record (format {FORMAT})")
    return document


def load_encoder(path: Path | str, device: torch.device | str = "cpu") -> SSLEncoder:
    """A saved encoder in eval mode without parameter gradients. Refuses weights whose SHA-256
    is not the one recorded at training (changed or swapped files)."""
    document = read_encoder_record(path)
    weights, record = encoder_files(path)
    if _sha256(weights) != document.get("weights_sha256"):
        raise SSLError(f"{weights} does not match {record.name} (its SHA-256 differs from the recorded one): the "
                       "weights were changed or replaced; use the encoder folder exactly as training wrote it")
    spec = document["architecture"]
    model = SSLEncoder(spec["widths"], spec["projection_dim"], spec["resolution"])
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise SSLError(f"{weights} does not fit the architecture in {record.name}: {exc}") from None
    return model.to(device=device, memory_format=torch.channels_last).eval().requires_grad_(False)


@torch.no_grad()
def encode(model: SSLEncoder, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """float32 representations (N, D) of uint8 or [0, 1] float images."""
    chunks = []
    for chunk in images.split(batch_size):
        x = chunk.float().div(255) if chunk.dtype == torch.uint8 else chunk.float()
        chunks.append(model.embed(x).float().cpu())
    return torch.cat(chunks)


def knn_accuracy(
    bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor, k: int = 20,
    temperature: float = 0.1,
) -> float:
    """Weighted k-NN accuracy on cosine similarity (Wu et al., CVPR 2018, the usual SSL probe):
    each query votes its k nearest bank items' labels, weighted by exp(similarity / temperature).
    Labels are only read here, for evaluation."""
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    similarity, index = (queries @ bank.T).topk(min(k, len(bank)), dim=1)
    classes = int(max(bank_labels.max(), query_labels.max())) + 1
    votes = torch.zeros(len(queries), classes).scatter_add_(1, bank_labels[index], (similarity / temperature).exp())
    return float((votes.argmax(dim=1) == query_labels).float().mean())

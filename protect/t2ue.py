"""T2UE: unlearnable noise from a text description alone.

Ma, Huang, Song, Sun, Gao, Jiang, "T2UE: Generating Unlearnable Examples from Text
Descriptions" (arXiv:2508.03091). A generator G maps a CLIP text embedding e = f_T(t) and a
random code z ~ N(0, I) to an L-inf perturbation of at most eps (8/255):

    G(e, z) = eps * tanh(conv(blocks(reshape(FC(z)))))   float32 (N, 3, R, R)

FC(z) is reshaped to a 4x4 feature map (512 channels in the paper) and grown by
semantic-spatial aware blocks (SSACN, from SSA-GAN: Liao et al., CVPR 2022), each doubling the
size and normalising its features with SSCBN, a batch norm whose scale and shift are predicted
from the text embedding and applied where a predicted spatial mask is high.

G is trained once, on image-text pairs, against a frozen CLIP surrogate: it minimises the
InfoNCE (CLIP) loss between f_I(x + G(f_T(t), z)) and f_T(t) (error-minimising noise for
contrastive learning), with Adam (decoupled weight decay), lr 1e-4 and a cosine schedule. After
that anyone produces protective noise from a caption alone (:func:`noise_from_text`): the image
never meets the generator.

A trained generator is stored as ``NAME.safetensors`` (weights plus a fingerprint of the text
encoder) and ``NAME.yaml`` (architecture, eps, which CLIP it belongs to, how it was trained).
Training checkpoints (``checkpoint.safetensors`` + ``checkpoint.json``) are written atomically
after every epoch, so an interrupted training resumes where it stopped.
"""

from __future__ import annotations

import csv
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
import yaml
from safetensors.torch import load_file, save_file

from protect.clip import ClipEncoders, load_clip
from protect.images import load_image, scan_folder, write_text_atomic
from protect.precision import autocast, check_precision
from protect.progress import NullReporter, Reporter
from protect.training_state import CheckpointError, load_training_state, save_training_state

# CLIP's prompt templates for zero-shot classification (Radford et al., arXiv:2103.00020,
# the ImageNet prompt ensemble), a few of them: captions for labelled folders. Class-wise noise
# uses the first one; sample-wise noise draws one per image.
CLIP_TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of a {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)
# SSA-GAN's channel multipliers of the base width, 4x4 map first (Liao et al., CVPR 2022); a
# generator for a smaller output keeps the last ones (it needs fewer upsampling blocks).
CHANNEL_MULTIPLIERS = (8, 8, 8, 8, 8, 4, 2, 1)
# Captions whose embeddings fingerprint the text encoder a generator was trained with.
_PROBE_CAPTIONS = ("a photo of a dog.", "a red car parked on a street.", "text to unlearnable noise")


class T2UEError(ValueError):
    """A generator file, a captions file or training data cannot be used; the message says why."""


# The network ------------------------------------------------------------------------------


class SemanticSpatialBatchNorm(nn.Module):
    """SSCBN: batch norm without its own affine parameters; scale 1 + m * gamma(e) and shift
    m * beta(e), with gamma, beta small MLPs of the text embedding e (N, D) and m (N, 1, H, W)
    the block's predicted mask in [0, 1]."""

    def __init__(self, channels: int, text_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gamma = nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(True), nn.Linear(hidden, channels))
        self.beta = nn.Sequential(nn.Linear(text_dim, hidden), nn.ReLU(True), nn.Linear(hidden, channels))
        # Start as plain batch norm; the text learns its way in.
        for head in (self.gamma[-1], self.beta[-1]):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, h: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scale = 1 + mask * self.gamma(text)[:, :, None, None]
        shift = mask * self.beta(text)[:, :, None, None]
        return self.norm(h) * scale + shift


class SemanticSpatialBlock(nn.Module):
    """SSACN block: optional 2x nearest upsampling, a mask predictor (conv-BN-ReLU-conv-sigmoid
    on the block input), two SSCBN-LeakyReLU-conv3x3 stages, and a residual shortcut (1x1 conv
    when the width changes). (N, C_in, H, W) -> (N, C_out, 2H or H, 2W or W)."""

    def __init__(self, in_channels: int, out_channels: int, text_dim: int, upsample: bool) -> None:
        super().__init__()
        self.upsample = upsample
        mask_hidden = max(16, in_channels // 4)
        self.mask = nn.Sequential(
            nn.Conv2d(in_channels, mask_hidden, 3, padding=1), nn.BatchNorm2d(mask_hidden), nn.ReLU(True),
            nn.Conv2d(mask_hidden, 1, 1), nn.Sigmoid(),
        )
        self.norm1 = SemanticSpatialBatchNorm(in_channels, text_dim)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = SemanticSpatialBatchNorm(out_channels, text_dim)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        mask = self.mask(x)
        h = self.conv1(F.leaky_relu(self.norm1(x, text, mask), 0.2))
        h = self.conv2(F.leaky_relu(self.norm2(h, text, mask), 0.2))
        return self.shortcut(x) + h


@dataclass(frozen=True)
class GeneratorSpec:
    """What builds a text-to-noise generator and which CLIP text encoder it belongs to.

    resolution: output size R (square); the network grows 4 -> the next power of two >= R and
    resizes to R. text_dim: the CLIP embedding size; z_dim: size of the random code; width: the
    channel base (the 4x4 map has 8 * width / 8 = ``width`` channels: 512 in the paper)."""

    resolution: int
    text_dim: int
    z_dim: int = 100
    width: int = 512
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"


class TextToNoiseGenerator(nn.Module):
    """G(e, z): text embedding (N, text_dim), code (N, z_dim) -> tanh output (N, 3, R, R) in
    [-1, 1]; multiply by eps for the perturbation (:meth:`perturbation`)."""

    def __init__(self, spec: GeneratorSpec) -> None:
        super().__init__()
        self.spec = spec
        upsamplings = max(0, math.ceil(math.log2(spec.resolution / 4)))
        multipliers = CHANNEL_MULTIPLIERS[-(upsamplings + 2):] if upsamplings + 2 <= len(CHANNEL_MULTIPLIERS) else (
            (CHANNEL_MULTIPLIERS[0],) * (upsamplings + 2 - len(CHANNEL_MULTIPLIERS)) + CHANNEL_MULTIPLIERS
        )
        channels = [max(1, spec.width * m // 8) for m in multipliers]
        self.start_channels = channels[0]
        self.fc = nn.Linear(spec.z_dim, channels[0] * 16)
        # The first block works on the 4x4 map itself; every later one doubles the size.
        self.blocks = nn.ModuleList(
            SemanticSpatialBlock(channels[i], channels[i + 1], spec.text_dim, upsample=i > 0)
            for i in range(len(channels) - 1)
        )
        self.head = nn.Conv2d(channels[-1], 3, 3, padding=1)

    def forward(self, text: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(len(z), self.start_channels, 4, 4)
        for block in self.blocks:
            h = block(h, text)
        out = torch.tanh(self.head(F.leaky_relu(h, 0.2)))
        if out.shape[-1] != self.spec.resolution:
            # bilinear resizing never leaves [-1, 1]
            out = F.interpolate(out, size=(self.spec.resolution, self.spec.resolution), mode="bilinear", align_corners=False)
        return out

    def perturbation(self, text: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
        """eps * G(e, z): float32 (N, 3, R, R) with every value in [-eps, eps] (L-inf)."""
        return eps * self.forward(text, z).float()


def build_generator(spec: GeneratorSpec, seed: int = 0) -> TextToNoiseGenerator:
    """A freshly initialised generator, deterministic for ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextToNoiseGenerator(spec)


# Text and codes ---------------------------------------------------------------------------


@torch.no_grad()
def embed_texts(clip: ClipEncoders, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Unit-length CLIP text embeddings, float32 (N, D) on the CPU."""
    chunks = [clip.encode_text(texts[i : i + batch_size]).float() for i in range(0, len(texts), batch_size)]
    return F.normalize(torch.cat(chunks), dim=-1).cpu()


def _stable_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def code_for(key: str, seed: int, z_dim: int) -> torch.Tensor:
    """The random code z ~ N(0, I) (z_dim,) belonging to ``key`` (a caption or an image path)
    under ``seed``: the same key and seed always give the same z, on any machine."""
    return torch.randn(z_dim, generator=torch.Generator().manual_seed(_stable_int("z", seed, key) % 2**63))


def template_for(key: str, seed: int, count: int) -> int:
    """Which of ``count`` templates the image ``key`` gets under ``seed`` (sample-wise captions)."""
    return _stable_int("template", seed, key) % count


def text_fingerprint(clip: ClipEncoders) -> torch.Tensor:
    """Embeddings of fixed probe captions (P, D): tells whether two CLIPs embed text alike."""
    return embed_texts(clip, list(_PROBE_CAPTIONS))


# Saved generators -------------------------------------------------------------------------


def generator_paths(path: Path | str) -> tuple[Path, Path]:
    """(weights .safetensors, description .yaml) of a generator given either file or the stem."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".yaml") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".yaml")


def save_generator(path: Path | str, net: TextToNoiseGenerator, eps: float, fingerprint: torch.Tensor, facts: dict[str, Any]) -> Path:
    """Write ``path`` (.safetensors, weights + text-encoder fingerprint) and its .yaml beside it,
    each atomically; the YAML last, so a listed generator always has its weights. Returns the
    weights path."""
    weights, description = generator_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors["text_fingerprint"] = fingerprint.contiguous()
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(weights)
    document = {
        "format": "protect-t2ue-generator/1",
        "paper": "Ma et al., T2UE (arXiv:2508.03091)",
        "eps": eps,
        "spec": dataclasses.asdict(net.spec),
        **facts,
    }
    write_text_atomic(description, yaml.safe_dump(document, sort_keys=False))
    return weights


@dataclass
class LoadedGenerator:
    """A trained generator in eval mode with the CLIP that embeds its captions."""

    net: TextToNoiseGenerator
    clip: ClipEncoders
    eps: float
    description: dict[str, Any]

    def embed(self, texts: list[str]) -> torch.Tensor:
        return embed_texts(self.clip, texts)


def read_generator_description(path: Path | str) -> dict[str, Any]:
    """The YAML of a saved generator; :class:`T2UEError` naming the file when it is missing."""
    weights, description = generator_paths(path)
    for needed in (weights, description):
        if not needed.is_file():
            raise T2UEError(
                f"t2ue generator file not found: {needed}; train one with `protect t2ue train DATA OUT_DIR` "
                "(it writes OUT_DIR/generator.safetensors and generator.yaml) and pass it with --set generator=PATH"
            )
    document = yaml.safe_load(description.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or document.get("format") != "protect-t2ue-generator/1":
        raise T2UEError(f"{description} is not a t2ue generator description (format protect-t2ue-generator/1)")
    return document


def load_generator(
    path: Path | str, *, clip_weights: str | None = None, device: torch.device | str = "cpu", clip_option: str = "surrogate_weights"
) -> LoadedGenerator:
    """Load a generator saved by :func:`save_generator` and the CLIP text encoder it was trained
    with (local weights only, see :func:`protect.clip.load_clip`); refuses a CLIP whose text
    embeddings differ from those the generator was trained on."""
    document = read_generator_description(path)
    weights, _ = generator_paths(path)
    spec = GeneratorSpec(**document["spec"])
    tensors = load_file(str(weights))
    net = TextToNoiseGenerator(spec)
    net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
    net.to(device).eval().requires_grad_(False)
    clip = load_clip(spec.clip_model, pretrained=spec.clip_pretrained, weights=clip_weights or None, device=device, option=clip_option)
    expected, found = tensors["text_fingerprint"].float(), text_fingerprint(clip)
    if found.shape != expected.shape or not torch.allclose(found, expected, atol=1e-3):
        raise T2UEError(
            f"{weights}: the CLIP text encoder ({spec.clip_model}, weights {clip.weights}) is not the one this "
            "generator was trained with; pass the same CLIP weights file"
        )
    return LoadedGenerator(net, clip, float(document["eps"]), document)


@torch.no_grad()
def noise_from_text(
    generator: LoadedGenerator, texts: list[str], codes: torch.Tensor, *, eps: float | None = None
) -> torch.Tensor:
    """Perturbations float32 (N, 3, R, R) in [-eps, eps] for N captions and codes (N, z_dim),
    from the text alone. eps defaults to the generator's training budget."""
    device = next(generator.net.parameters()).device
    embeddings = generator.embed(texts).to(device)
    return generator.net.perturbation(embeddings, codes.to(device), generator.eps if eps is None else eps).cpu()


# Image-text pairs -------------------------------------------------------------------------


@dataclass
class TextImagePairs:
    """images: uint8 (N, 3, R, R); texts: the distinct captions; options: int64 (N, K) indices
    into ``texts``, the captions each image may be paired with (one is drawn per step: K
    templates for class-name captions, K = 1 for given captions); source: where they came from."""

    images: torch.Tensor
    texts: list[str]
    options: torch.Tensor
    source: str

    def __len__(self) -> int:
        return len(self.images)


def _small(path: Path, resolution: int) -> torch.Tensor:
    from protect.pipeline import working_tensor  # the pipeline's own resizing, so noise is fitted as applied

    return working_tensor(load_image(path), resolution)


def class_captions(classes: list[str], templates: tuple[str, ...] | list[str]) -> list[str]:
    """Every template over every class name (underscores as spaces), template-major."""
    return [template.format(name.replace("_", " ")) for template in templates for name in classes]


def pairs_from_folder(root: Path, resolution: int, templates: tuple[str, ...] | list[str], per_class: int | None = None) -> TextImagePairs:
    """Pairs from a labelled folder: each image with every template over its class name."""
    scan = scan_folder(Path(root))
    if not scan.labelled:
        raise T2UEError(f"{root} has no class subfolders; give a labelled folder or a CSV/JSONL of image,caption pairs")
    index = {name: i for i, name in enumerate(scan.classes)}
    taken: dict[str, int] = {}
    images, labels = [], []
    for entry in scan.entries:
        if per_class is not None and taken.get(entry.label, 0) >= per_class:
            continue
        taken[entry.label] = taken.get(entry.label, 0) + 1
        images.append(_small(entry.path, resolution))
        labels.append(index[entry.label])
    if not images:
        raise T2UEError(f"no images found in {root}")
    label_tensor = torch.tensor(labels)
    options = torch.stack([t * len(scan.classes) + label_tensor for t in range(len(templates))], dim=1)
    return TextImagePairs(torch.stack(images), class_captions(scan.classes, templates), options, str(root))


IMAGE_KEYS = ("image", "path", "file", "filename")
CAPTION_KEYS = ("caption", "text")


def read_caption_records(path: Path) -> list[tuple[str, str]]:
    """(image path, caption) records of a CSV (header row) or JSONL file; the image column is
    one of image/path/file/filename, the caption column caption/text."""
    path = Path(path)
    if not path.is_file():
        raise T2UEError(f"captions file not found: {path}")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise T2UEError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    else:
        raise T2UEError(f"{path}: captions must be a .csv or .jsonl file")
    records = []
    for number, row in enumerate(rows, 1):
        image = next((row[k] for k in IMAGE_KEYS if isinstance(row, dict) and row.get(k)), None)
        caption = next((row[k] for k in CAPTION_KEYS if isinstance(row, dict) and row.get(k)), None)
        if image is None or caption is None:
            raise T2UEError(f"{path}: record {number} needs an image path ({'/'.join(IMAGE_KEYS)}) and a caption "
                            f"({'/'.join(CAPTION_KEYS)})")
        records.append((str(image), str(caption).strip()))
    if not records:
        raise T2UEError(f"{path}: no records")
    return records


def pairs_from_file(path: Path, resolution: int) -> TextImagePairs:
    """Pairs from a CSV/JSONL of (image path, caption); relative paths are relative to the file's folder."""
    path = Path(path)
    records = read_caption_records(path)
    texts = list(dict.fromkeys(caption for _, caption in records))
    index = {text: i for i, text in enumerate(texts)}
    images = []
    for image, _ in records:
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        images.append(_small(image_path, resolution))
    options = torch.tensor([[index[caption]] for _, caption in records])
    return TextImagePairs(torch.stack(images), texts, options, str(path))


# Training ---------------------------------------------------------------------------------


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
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), e.g. 8/255; got {self.eps}")
        if self.resolution < 4 or self.z_dim < 1 or self.width < 8:
            raise ValueError("resolution must be >= 4, z_dim >= 1 and width >= 8")
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

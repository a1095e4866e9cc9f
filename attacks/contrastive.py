"""A contrastive victim: a small CLIP trained from scratch on (possibly protected) image-text
pairs with open_clip's loss, scored on clean held-out pairs by zero-shot accuracy and retrieval
recall.

Radford et al., CLIP (arXiv:2103.00020); the T2UE paper's multimodal victims are CLIPs trained
from scratch on protected pairs with their own captions (Ma et al., arXiv:2508.03091, Sec. 4).

Captions: each image has its own (:func:`attribute_captions` describes what an image shows, its
class, main colour, background colour and brightness; or a user's CSV/JSONL,
:func:`captions_from_file`), so a held-out set has many distinct captions and recall can move
both ways. Recall@K: image->text, the fraction of test images whose own caption is among the K
nearest distinct captions; text->image, the fraction of distinct captions with one of their
images among the K nearest images. Zero-shot accuracy: each test image against one prompt per
class ("a photo of a {class}.").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from attacks.train import random_crop_flip
from protect.models.clip import ClipEncoders, load_clip
from protect.precision import autocast
from protect.t2ue.data import read_caption_records

RECALL_AT = (1, 5, 10)
CONTRASTIVE_VICTIMS = {"clip-small": "protect-small-clip", "clip-tiny": "protect-tiny-clip"}


@dataclass
class ClipTrainConfig:
    """open_clip's training recipe scaled down: AdamW (beta2 0.98, eps 1e-6), lr 5e-4, weight
    decay 0.2 on matrices, linear warmup then cosine; random crop + flip; bf16 autocast where
    protect.precision finds it fast."""

    epochs: int = 15
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.2
    warmup_fraction: float = 0.1
    augment: bool = True
    precision: str = "auto"


@dataclass
class ClipTrainResult:
    recall: list[dict[str, float]] = field(default_factory=list)  # zero-shot accuracy and recall after each epoch
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def build_clip_victim(name: str, *, seed: int = 0, device: torch.device | str = "cpu") -> ClipEncoders:
    """A randomly initialised, trainable CLIP (``clip-small`` or ``clip-tiny``), deterministic for ``seed``."""
    if name not in CONTRASTIVE_VICTIMS:
        raise ValueError(f"unknown contrastive victim {name!r}; available: {', '.join(CONTRASTIVE_VICTIMS)}")
    clip = load_clip(CONTRASTIVE_VICTIMS[name], weights="random", seed=seed, device=device)
    clip.model.requires_grad_(True)
    return clip


def _tokens(clip: ClipEncoders, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct captions tokenised once (T, L), and each pair's index into them (N,)."""
    distinct = list(dict.fromkeys(captions))
    index = {c: i for i, c in enumerate(distinct)}
    return clip.tokenizer(distinct), torch.tensor([index[c] for c in captions])


def recall_at_k(similarity: torch.Tensor, caption_of: torch.Tensor, ks: tuple[int, ...] = RECALL_AT) -> dict[str, float]:
    """Recall@K both ways from a similarity matrix (N images, T distinct captions), in [0, 1].

    caption_of: int64 (N,), the index of each image's own caption. image->text: the share of
    images whose caption is among their K most similar captions; text->image: the share of
    captions with at least one of their images among their K most similar images."""
    result = {}
    for k in ks:
        top_texts = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
        result[f"image_to_text_r{k}"] = float((top_texts == caption_of[:, None]).any(dim=1).float().mean())
        top_images = similarity.T.topk(min(k, similarity.shape[0]), dim=1).indices  # (T, k)
        hits = caption_of[top_images] == torch.arange(similarity.shape[1])[:, None]
        result[f"text_to_image_r{k}"] = float(hits.any(dim=1).float().mean())
    return result


@torch.no_grad()
def _image_features(clip: ClipEncoders, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    device = next(clip.model.parameters()).device
    return torch.cat([
        F.normalize(clip.encode_image(images[i : i + batch_size].to(device).float().div(255)).float(), dim=-1).cpu()
        for i in range(0, len(images), batch_size)
    ])


@torch.no_grad()
def _text_features(clip: ClipEncoders, tokens: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    device = next(clip.model.parameters()).device
    return torch.cat([
        F.normalize(clip.model.encode_text(tokens[i : i + batch_size].to(device)).float(), dim=-1).cpu()
        for i in range(0, len(tokens), batch_size)
    ])


@torch.no_grad()
def retrieval_recall(clip: ClipEncoders, images: torch.Tensor, captions: list[str], *, batch_size: int = 500) -> dict[str, float]:
    """Recall@1/5/10 both ways on clean pairs (see :func:`recall_at_k`), in [0, 1].

    images: uint8 (N, 3, S, S); captions: N strings (repeated captions count as the same text)."""
    clip.model.eval()
    tokens, caption_of = _tokens(clip, captions)
    similarity = _image_features(clip, images, batch_size) @ _text_features(clip, tokens, batch_size).T
    return recall_at_k(similarity, caption_of)


@torch.no_grad()
def zero_shot_accuracy(
    clip: ClipEncoders, images: torch.Tensor, labels: torch.Tensor, classes: list[str], template: str = "a photo of a {}."
) -> float:
    """Share of ``images`` (uint8) whose nearest class prompt is their own class, in [0, 1]."""
    clip.model.eval()
    prompts = clip.tokenizer([template.format(name.replace("_", " ")) for name in classes])
    predicted = (_image_features(clip, images) @ _text_features(clip, prompts).T).argmax(dim=1)
    return float((predicted == labels.cpu()).float().mean())


@dataclass
class HeldOutPairs:
    """Clean held-out pairs a contrastive victim is scored on: uint8 images (N, 3, S, S), one
    caption each, and labels into ``classes`` for zero-shot accuracy."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor
    classes: list[str]

    def score(self, clip: ClipEncoders) -> dict[str, float]:
        """Zero-shot accuracy and recall@1/5/10 both ways, in [0, 1]."""
        return {"zero_shot": zero_shot_accuracy(clip, self.images, self.labels, self.classes),
                **retrieval_recall(clip, self.images, self.captions)}


def train_clip(
    clip: ClipEncoders,
    images: torch.Tensor,
    captions: list[str],
    config: ClipTrainConfig,
    *,
    test: HeldOutPairs | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_epoch: Callable[[int, float, dict[str, float]], None] | None = None,
) -> ClipTrainResult:
    """Train ``clip`` (all of it) on (image, caption) pairs with open_clip's ClipLoss.

    images: uint8 (N, 3, S, S); captions: N strings. ``test``: clean held-out pairs scored after
    every epoch (:meth:`HeldOutPairs.score`)."""
    from open_clip.loss import ClipLoss

    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    model = clip.model.to(device)
    tokens, caption_of = _tokens(clip, captions)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    steps = config.epochs * -(-len(images) // config.batch_size)
    warmup = max(1, round(config.warmup_fraction * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    )
    loss_fn = ClipLoss()
    result = ClipTrainResult()
    started = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        total, count = 0.0, 0
        for idx in torch.randperm(len(images), generator=gen).split(config.batch_size):
            if len(idx) < 2:
                continue
            x = images[idx].to(device).float().div(255)
            if config.augment:
                x = random_crop_flip(x, gen)
            with autocast(device, config.precision):
                image_features = F.normalize(clip.encode_image(x), dim=-1)
                # each distinct caption of the batch is encoded once (template captions repeat a lot)
                distinct, inverse = caption_of[idx].unique(return_inverse=True)
                text_features = F.normalize(model.encode_text(tokens[distinct].to(device)), dim=-1)[inverse.to(device)]
            loss = loss_fn(image_features.float(), text_features.float(), model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))  # as open_clip does
            total, count = total + float(loss.detach()) * len(idx), count + len(idx)
        result.losses.append(total / max(count, 1))
        recall = test.score(clip) if test is not None else {}
        result.recall.append(recall)
        if on_epoch is not None:
            on_epoch(epoch, result.losses[-1], recall)
    result.seconds = time.perf_counter() - started
    model.eval()
    return result


def save_clip(clip: ClipEncoders, path: Path | str) -> Path:
    """The model's state dict as safetensors (loadable with ``protect.models.clip.load_clip(weights=path)``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in clip.model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return path


def class_caption_list(labels: torch.Tensor, classes: list[str], template: str = "a photo of a {}.") -> list[str]:
    """One caption per image from its class name (underscores as spaces)."""
    return [template.format(classes[int(label)].replace("_", " ")) for label in labels]


COLOUR_NAMES = ("black", "white", "gray", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
# Hue bins (degrees) and the colour each one names: red wraps round 0/360.
_HUE_EDGES = torch.tensor([15.0, 40.0, 70.0, 170.0, 260.0, 300.0, 340.0])
_HUE_COLOUR = torch.tensor([3, 4, 5, 6, 7, 8, 9, 3])


def pixel_colours(rgb: torch.Tensor) -> torch.Tensor:
    """The index into :data:`COLOUR_NAMES` of every pixel of float (..., 3) RGB in [0, 1]:
    black, white and gray by value and saturation, the rest by hue, dark orange/yellow as brown."""
    high, low = rgb.max(-1).values, rgb.min(-1).values
    spread = (high - low).clamp(min=1e-6)
    saturation = torch.where(high > 0, (high - low) / high.clamp(min=1e-6), torch.zeros_like(high))
    r, g, b = rgb.unbind(-1)
    hue = 60 * torch.where(high == r, ((g - b) / spread) % 6, torch.where(high == g, (b - r) / spread + 2, (r - g) / spread + 4))
    colour = _HUE_COLOUR[torch.bucketize(hue, _HUE_EDGES)]
    brown = ((colour == 4) & (high < 0.6)) | ((colour == 5) & (high < 0.45))
    colour = torch.where(brown, 10, colour)
    chromatic = (saturation >= 0.15) & (high >= 0.2)
    neutral = torch.where(high < 0.2, 0, torch.where((high >= 0.8) & (saturation < 0.15), 1, 2))
    return torch.where(chromatic, colour, neutral)


def _dominant_colour(colours: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    counts = torch.stack([((colours == k) & region).sum(dim=(1, 2)) for k in range(len(COLOUR_NAMES))], dim=1)
    return counts.argmax(dim=1)


def attribute_captions(images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> list[str]:
    """A caption per image that says what it shows: its class, the most common colour of its
    centre (the middle half) and of its border (the outer eighth), and whether it is dark or
    bright, e.g. "a dark photo of a brown horse on a green background.". images: uint8
    (N, 3, H, W). On 2,000 CIFAR-10 test images this gives about 600 distinct captions, so
    retrieval needs more than the class."""
    n, _, h, w = images.shape
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centre = ((rows >= h // 4) & (rows < h - h // 4) & (cols >= w // 4) & (cols < w - w // 4))[None]
    ring = max(1, h // 8)
    border = ((rows < ring) | (rows >= h - ring) | (cols < ring) | (cols >= w - ring))[None]
    captions = []
    for start in range(0, n, 1000):
        chunk = images[start : start + 1000].float().div(255)
        colours = pixel_colours(chunk.permute(0, 2, 3, 1))
        main, background = _dominant_colour(colours, centre), _dominant_colour(colours, border)
        brightness = chunk.mean(dim=(1, 2, 3))
        for label, fg, bg, light in zip(labels[start : start + 1000].tolist(), main.tolist(), background.tolist(), brightness.tolist()):
            mood = "dark " if light < 0.35 else "bright " if light > 0.6 else ""
            name = classes[int(label)].replace("_", " ")
            captions.append(f"a {mood}photo of a {COLOUR_NAMES[fg]} {name} on a {COLOUR_NAMES[bg]} background.")
    return captions


def captions_from_file(path: Path | str, paths: list[str]) -> list[str]:
    """The caption of each image in ``paths`` (relative to the image folder) from a CSV/JSONL of
    image,caption records (the format of ``protect t2ue train``); an image without a caption is
    an error naming it."""
    given = {Path(image).as_posix(): caption for image, caption in read_caption_records(Path(path))}
    missing = [p for p in paths if Path(p).as_posix() not in given]
    if missing:
        raise ValueError(f"{path} has no caption for {missing[0]}" + (f" (and {len(missing) - 1} more images)" if len(missing) > 1 else "")
                         + "; image paths are relative to the image folder")
    return [given[Path(p).as_posix()] for p in paths]


def contrastive_cell(
    victim: str, train_images: torch.Tensor, train_captions: list[str], test: HeldOutPairs,
    *, epochs: int, seed: int, data_transform: Callable | None = None, device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float, dict[str, float]], None] | None = None,
) -> dict:
    """One contrastive-victim run for ``protect verify``: its per-epoch "accuracy" is zero-shot
    accuracy on the clean held-out images, with recall@1/5/10 both ways on their captions in
    ``recall``."""
    gen = torch.Generator().manual_seed(seed)
    images = data_transform(train_images, gen) if data_transform is not None else train_images
    clip = build_clip_victim(victim, seed=seed, device=device)
    config = ClipTrainConfig(epochs=epochs, batch_size=min(256, max(32, len(images) // 20)))
    result = train_clip(clip, images, train_captions, config, test=test, device=device, seed=seed, on_epoch=on_epoch)
    accuracy = [r["zero_shot"] for r in result.recall]
    recall = {k: v for k, v in result.recall[-1].items() if k != "zero_shot"}
    return {"test_accuracy": accuracy, "final": accuracy[-1], "peak": max(accuracy), "seconds": result.seconds,
            "recall": recall, "losses": result.losses, "distinct_test_captions": len(set(test.captions))}

"""A contrastive victim: a small CLIP trained from scratch on (possibly protected) image-text
pairs with open_clip's loss, scored by retrieval recall on clean test pairs.

Radford et al., CLIP (arXiv:2103.00020); the T2UE paper's multimodal victims are CLIPs trained
from scratch on protected pairs (Ma et al., arXiv:2508.03091, Sec. 4). Recall@K: image->text,
the fraction of test images whose own caption is among the K nearest captions (distinct
captions only); text->image, the fraction of distinct captions with one of their images among
the K nearest images. With one caption per class, image->text recall@1 is zero-shot accuracy.
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
    recall: list[dict[str, float]] = field(default_factory=list)  # after each epoch
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


@torch.no_grad()
def retrieval_recall(clip: ClipEncoders, images: torch.Tensor, captions: list[str], *, batch_size: int = 500) -> dict[str, float]:
    """Recall@1/5/10 both ways on clean pairs (see the module docstring), in [0, 1].

    images: uint8 (N, 3, S, S); captions: N strings (repeated captions count as the same text)."""
    clip.model.eval()
    device = next(clip.model.parameters()).device
    tokens, caption_of = _tokens(clip, captions)
    image_features = torch.cat([
        F.normalize(clip.encode_image(images[i : i + batch_size].to(device).float().div(255)).float(), dim=-1).cpu()
        for i in range(0, len(images), batch_size)
    ])
    text_features = torch.cat([
        F.normalize(clip.model.encode_text(tokens[i : i + batch_size].to(device)).float(), dim=-1).cpu()
        for i in range(0, len(tokens), batch_size)
    ])
    similarity = image_features @ text_features.T  # (N images, T texts)
    result = {}
    for k in RECALL_AT:
        top_texts = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
        result[f"image_to_text_r{k}"] = float((top_texts == caption_of[:, None]).any(dim=1).float().mean())
        top_images = similarity.T.topk(min(k, similarity.shape[0]), dim=1).indices  # (T, k)
        hits = caption_of[top_images] == torch.arange(len(tokens))[:, None]
        result[f"text_to_image_r{k}"] = float(hits.any(dim=1).float().mean())
    return result


def train_clip(
    clip: ClipEncoders,
    images: torch.Tensor,
    captions: list[str],
    config: ClipTrainConfig,
    *,
    test: tuple[torch.Tensor, list[str]] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    on_epoch: Callable[[int, float, dict[str, float]], None] | None = None,
) -> ClipTrainResult:
    """Train ``clip`` (all of it) on (image, caption) pairs with open_clip's ClipLoss.

    images: uint8 (N, 3, S, S); captions: N strings. ``test``: clean (images, captions) scored
    with :func:`retrieval_recall` after every epoch."""
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
        recall = retrieval_recall(clip, *test) if test is not None else {}
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


def contrastive_cell(
    victim: str, train_images: torch.Tensor, train_captions: list[str], test_images: torch.Tensor, test_captions: list[str],
    *, epochs: int, seed: int, data_transform: Callable | None = None, device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float, dict[str, float]], None] | None = None,
) -> dict:
    """One contrastive-victim run for ``protect verify``: its per-epoch "accuracy" is
    image->text recall@1 on the clean test pairs (zero-shot accuracy with one caption per
    class), with every recall in ``recall``."""
    gen = torch.Generator().manual_seed(seed)
    images = data_transform(train_images, gen) if data_transform is not None else train_images
    clip = build_clip_victim(victim, seed=seed, device=device)
    config = ClipTrainConfig(epochs=epochs, batch_size=min(256, max(32, len(images) // 20)))
    result = train_clip(clip, images, train_captions, config, test=(test_images, test_captions), device=device, seed=seed, on_epoch=on_epoch)
    accuracy = [r["image_to_text_r1"] for r in result.recall]
    return {"test_accuracy": accuracy, "final": accuracy[-1], "peak": max(accuracy), "seconds": result.seconds,
            "recall": result.recall[-1], "losses": result.losses}

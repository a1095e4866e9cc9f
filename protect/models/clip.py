"""CLIP image and text encoders through open_clip, loaded only from local files.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(arXiv:2103.00020); models and weights from open_clip (github.com/mlfoundations/open_clip).

Nothing here downloads. The architecture is built from open_clip's config by name
(``open_clip.create_model(name, pretrained=None)``); the weights come from, in order:

1. an explicit local file (``.safetensors``, or a ``.bin``/``.pt``/``.pth`` state dict read with
   ``torch.load(..., weights_only=True)``),
2. the Hugging Face cache that open_clip itself would fill (``HF_HOME``; read offline),
3. nothing: :class:`ClipWeightsNotFound` says which file to download, from where, and how to
   pass it.

``weights="random"`` keeps the random initialisation (seeded): for tests and experiments only.
The tiny architecture ``protect-tiny-clip`` (ViT, 32 px, 2 layers, 32-d embedding, small text
tower) ships with the package so tests build a CLIP without any network or weights;
``protect-small-clip`` (ViT, 32 px, 4x4 patches, 4 layers, 128-d) is a small CLIP to train from
scratch on CIFAR-size image-text pairs (a surrogate or a contrastive victim on a CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

TINY_TEST_MODEL = "protect-tiny-clip"
RANDOM_WEIGHTS = "random"
_CONFIG_DIR = Path(__file__).resolve().parent / "clip_configs"
# The Hugging Face file names open_clip looks for in a model repository, safest first.
_HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class ClipWeightsNotFound(FileNotFoundError):
    """The pretrained CLIP weights are not on this machine; the message says what to fetch."""


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError:
        raise ImportError(
            "CLIP surrogates need open_clip: pip install 'protect[clip]' (or pip install open-clip-torch)"
        ) from None
    known = set(open_clip.list_models())
    for config in sorted(_CONFIG_DIR.glob("*.json")):
        if config.stem not in known:
            open_clip.add_model_config(config)
    return open_clip


@dataclass
class ClipEncoders:
    """A CLIP model with its preprocessing, taking pixels in [0, 1].

    ``encode_image``: float (N, 3, H, W) in [0, 1], any size -> (N, D) unnormalised image
    embeddings (resized bilinearly to ``image_size`` and normalised with the model's mean/std
    inside, so gradients reach the pixels). ``encode_text``: list of N strings -> (N, D).
    """

    model: nn.Module
    name: str
    weights: str
    image_size: int
    mean: torch.Tensor
    std: torch.Tensor
    tokenizer: Any

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return self.model.encode_image((images - mean) / std)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(texts).to(device))


def hf_model_file(model: str, pretrained: str) -> tuple[str, str] | None:
    """(repository id, file name) on the Hugging Face Hub of open_clip's ``model``/``pretrained``
    weights, or None when open_clip knows no such pair."""
    open_clip = _open_clip()
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    repo, filename = hub.rstrip("/").rsplit("/", 1) if not hub.endswith("/") else (hub.rstrip("/"), "")
    return repo, filename or _HF_WEIGHT_FILES[0]


def _cached_hf_weights(model: str, pretrained: str) -> str | None:
    """A weights file for ``model``/``pretrained`` already in the local Hugging Face cache."""
    located = hf_model_file(model, pretrained)
    if located is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo, filename = located
    for name in dict.fromkeys((filename, *_HF_WEIGHT_FILES)):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _download_advice(model: str, pretrained: str, target: str) -> str:
    """What to download and how to hand it over; ``target`` ends "pass the file as ..." or
    "put the file at ..."."""
    located = hf_model_file(model, pretrained)
    if located is None:
        open_clip = _open_clip()
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        return (
            f"open_clip knows no pretrained weights {pretrained!r} for {model!r} (known tags: {tags}); "
            f"{target.replace('the file', 'a state-dict file of that architecture')}"
        )
    repo, filename = located
    url = f"https://huggingface.co/{repo}/resolve/main/{filename}"
    return (
        f"download {url} (e.g. `huggingface-cli download {repo} {filename}` on a machine with network access) "
        f"and {target}, or copy that machine's Hugging Face cache (~/.cache/huggingface) here "
        "and run with HF_HUB_OFFLINE=1"
    )


def resolve_clip_weights(model: str, pretrained: str, weights: str | Path | None, *, option: str = "surrogate_weights") -> str:
    """The local weights file to load (or ``"random"``); raises :class:`ClipWeightsNotFound`
    naming what to download when there is none. ``option`` is how the user passes a file."""
    target = f"pass the file as --set {option}=PATH"
    if weights == RANDOM_WEIGHTS:
        return RANDOM_WEIGHTS
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            advice = _download_advice(model, pretrained, f"put the file at {path}")
            raise ClipWeightsNotFound(f"CLIP weights file not found: {path} ({option}); {advice}")
        return str(path)
    cached = _cached_hf_weights(model, pretrained)
    if cached is None:
        raise ClipWeightsNotFound(
            f"no local weights for CLIP {model} (pretrained {pretrained!r}): {option} is empty and the Hugging Face "
            f"cache has none; {_download_advice(model, pretrained, target)}"
        )
    return cached


def load_clip(
    model: str,
    *,
    pretrained: str = "openai",
    weights: str | Path | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    option: str = "surrogate_weights",
) -> ClipEncoders:
    """Build open_clip's ``model`` and load local weights (see the module docstring).

    pretrained: the open_clip tag the weights belong to (picks QuickGELU and mean/std, and which
    file to look for in the cache); weights: a file, ``"random"``, or None/"" for the cache.
    Returned in eval mode with gradients off, float32, on ``device``.
    """
    open_clip = _open_clip()
    if model not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model!r}; e.g. RN50, ViT-B-32, ViT-B-16 ({TINY_TEST_MODEL} for tests)")
    source = resolve_clip_weights(model, pretrained, weights, option=option)
    tag_cfg = {} if source == RANDOM_WEIGHTS else open_clip.get_pretrained_cfg(model, pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = open_clip.create_model(model, pretrained=None, force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
    if source != RANDOM_WEIGHTS:
        open_clip.load_checkpoint(net, source, weights_only=True)
    net = net.to(device).eval().requires_grad_(False)
    preprocess = {**open_clip.get_model_preprocess_cfg(net), **{k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg}}
    size = preprocess.get("size", 224)
    return ClipEncoders(
        model=net,
        name=model,
        weights=source,
        image_size=int(size if isinstance(size, int) else size[0]),
        mean=torch.tensor(preprocess.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1),
        std=torch.tensor(preprocess.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1),
        tokenizer=open_clip.get_tokenizer(model),
    )

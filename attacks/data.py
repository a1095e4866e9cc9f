"""Labelled image folders as uint8 tensors, for training victims without per-sample Python."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from protect.images import load_image, scan_folder
from protect.scale import median_shorter_side


@dataclass
class ImageSet:
    """images: uint8 (N, 3, S, S); labels: int64 (N,); classes: label names; paths relative."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def load_image_folder(
    root: Path | str, *, size: int = 32, per_class: int | None = None, classes: list[str] | None = None
) -> ImageSet:
    """Read an ImageFolder tree (one subfolder per class) into tensors at ``size`` x ``size``.

    per_class: take the first N files of each class sorted by name (the protocol subsets).
    classes: fix the class order (e.g. to match a test set); default is the sorted folder names.
    """
    scan = scan_folder(Path(root))
    if not scan.labelled:
        raise ValueError(f"{root} is not an ImageFolder tree (one subfolder per class)")
    class_names = classes if classes is not None else scan.classes
    index = {name: i for i, name in enumerate(class_names)}
    taken: dict[str, int] = {}
    images, labels, paths = [], [], []
    for entry in scan.entries:
        if entry.label not in index:
            raise ValueError(f"{entry.path}: class {entry.label!r} is not among {class_names}")
        if per_class is not None and taken.get(entry.label, 0) >= per_class:
            continue
        taken[entry.label] = taken.get(entry.label, 0) + 1
        images.append(_read_small(entry.path, size))
        labels.append(index[entry.label])
        paths.append(str(entry.relpath))
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.long), list(class_names), paths)


#: the sizes victims train at by default, for thumbnails, small photos and photos
VICTIM_SIZES = (32, 64, 112)


def victim_size(root: Path | str, sample: int = 64) -> tuple[int, int]:
    """(the size victims train at by default, the median shorter side it was chosen from) for the
    images under ``root``, from the headers of up to ``sample`` images spread over the folder:
    32 px below 64 px (thumbnails, trained at about their own size), 64 px below 112 px, and
    112 px for photos (half the ImageNet 224 px, a quarter of its cost; ``--size 224`` trains
    at ImageNet's)."""
    entries = scan_folder(Path(root)).entries
    if not entries:
        raise ValueError(f"{root}: no images")
    step = max(1, len(entries) // sample)
    sizes = []
    for entry in entries[::step][:sample]:
        with Image.open(entry.path) as image:
            sizes.append(image.size)
    side = median_shorter_side(sizes) or 0
    size = VICTIM_SIZES[0] if side < 64 else VICTIM_SIZES[1] if side < 112 else VICTIM_SIZES[2]
    return size, side


def _read_manifest_pairs(protected_dir: Path) -> list[tuple[str, str]] | None:
    manifest = protected_dir / "manifest.jsonl"
    if not manifest.exists():
        return None
    pairs = []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            pairs.append((record["input"], record["output"]))
    return pairs


def _pairs_by_path(protected_dir: Path, clean_dir: Path) -> list[tuple[str, str]]:
    """Without a manifest: match files by relative path, ignoring the suffix."""
    clean = {str(e.relpath.with_suffix("")): str(e.relpath) for e in scan_folder(clean_dir).entries}
    pairs = []
    for entry in scan_folder(protected_dir).entries:
        stem = str(entry.relpath.with_suffix(""))
        if stem not in clean:
            raise ValueError(f"{entry.path} has no clean original in {clean_dir} (matched by relative path)")
        pairs.append((clean[stem], str(entry.relpath)))
    return pairs


def _read_small(path: Path, size: int) -> torch.Tensor:
    rgb = load_image(path).rgb
    if rgb.shape[:2] != (size, size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def load_pairs(protected_dir: Path | str, clean_dir: Path | str, *, size: int = 32) -> tuple[ImageSet, ImageSet]:
    """The clean originals and their protected copies, aligned, labelled by the clean tree's
    first-level folders. Pairs come from ``manifest.jsonl`` (written by ``protect run``) or,
    without one, from matching relative paths."""
    protected_dir, clean_dir = Path(protected_dir), Path(clean_dir)
    pairs = _read_manifest_pairs(protected_dir) or _pairs_by_path(protected_dir, clean_dir)
    if not pairs:
        raise ValueError(f"{protected_dir} holds no protected images")
    labels_of = {}
    for clean_rel, _ in pairs:
        parts = Path(clean_rel).parts
        if len(parts) < 2:
            raise ValueError(f"{clean_dir}: {clean_rel} is not in a class subfolder; verify needs labelled data")
        labels_of[clean_rel] = parts[0]
    classes = sorted(set(labels_of.values()))
    index = {name: i for i, name in enumerate(classes)}
    clean_images, protected_images, labels = [], [], []
    for clean_rel, protected_rel in pairs:
        clean_path, protected_path = clean_dir / clean_rel, protected_dir / protected_rel
        if not clean_path.exists():
            raise ValueError(f"{protected_dir} and {clean_dir} do not match: {clean_rel} (in the manifest) is missing from {clean_dir}")
        if not protected_path.exists():
            raise ValueError(f"{protected_path} is listed in the manifest but missing")
        clean_images.append(_read_small(clean_path, size))
        protected_images.append(_read_small(protected_path, size))
        labels.append(index[labels_of[clean_rel]])
    label_tensor = torch.tensor(labels, dtype=torch.long)
    paths = [clean_rel for clean_rel, _ in pairs]
    return (
        ImageSet(torch.stack(clean_images), label_tensor, classes, paths),
        ImageSet(torch.stack(protected_images), label_tensor.clone(), classes, paths),
    )


def mix_with_clean(protected: ImageSet, clean: ImageSet, clean_fraction: float, seed: int) -> ImageSet:
    """Replace a random ``clean_fraction`` of the protected images by their clean originals
    (the two sets aligned image by image)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    chosen = torch.randperm(len(protected), generator=gen)[: round(clean_fraction * len(protected))]
    images = protected.images.clone()
    images[chosen] = clean.images[chosen]
    return ImageSet(images, protected.labels, protected.classes, protected.paths)

"""Labelled image folders as uint8 tensors, for training victims without per-sample Python."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from protect.images import ImageReadError, load_image, read_file, scan_folder
from protect.runner.formats import unsafe_member_reason
from protect.scale import median_shorter_side


@dataclass
class ImageSet:
    """images: uint8 (N, 3, S, S); labels: int64 (N,); classes: label names; paths relative;
    linf_levels: for protected copies, the largest |protected - clean| over all pairs, in 8-bit
    levels, measured on the files at their own resolution."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    paths: list[str]
    linf_levels: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: torch.Tensor) -> "ImageSet":
        """The images at positions ``index`` (int64), in that order."""
        return ImageSet(self.images[index], self.labels[index], self.classes, [self.paths[i] for i in index.tolist()])


def load_image_folder(
    root: Path | str, *, size: int = 32, per_class: int | None = None, classes: list[str] | None = None
) -> ImageSet:
    """Read an ImageFolder tree (one subfolder per class) into tensors at ``size`` x ``size``.

    per_class: take the first N files of each class sorted by name (the protocol subsets).
    classes: fix the class order (e.g. to match a test set); default is the sorted folder names.
    """
    # Verification only reads (and publishes nothing), so links out of the folder are followed.
    scan = scan_folder(Path(root), allow_outside=True)
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
    # Links are followed as the rest of verification follows them; files are read through
    # protect.images' bounded reader (no FIFO, no file over the byte limit), headers only decoded.
    entries = [entry for entry in scan_folder(Path(root), allow_outside=True).entries if entry.problem is None]
    if not entries:
        raise ValueError(f"{root}: no images")
    step = max(1, len(entries) // sample)
    sizes = []
    for entry in entries[::step][:sample]:
        try:
            with Image.open(io.BytesIO(read_file(entry.path))) as image:
                sizes.append(image.size)
        except (ImageReadError, OSError, ValueError, Image.DecompressionBombError):
            continue  # unreadable here: the size comes from the others
    if not sizes:
        raise ValueError(f"{root}: no readable images to choose the victims' size from")
    side = median_shorter_side(sizes) or 0
    size = VICTIM_SIZES[0] if side < 64 else VICTIM_SIZES[1] if side < 112 else VICTIM_SIZES[2]
    return size, side


def _read_manifest_pairs(protected_dir: Path) -> list[tuple[str, str]] | None:
    manifest = protected_dir / "manifest.jsonl"
    if not manifest.exists():
        return None
    pairs = []
    for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            pair = (record["input"], record["output"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{manifest}: line {number} is not a record of `protect run` (input, output)") from None
        for name in pair:
            problem = unsafe_member_reason(name) if isinstance(name, str) else "not a path"
            if problem:
                raise ValueError(f"{manifest}: line {number} names {name!r} ({problem}): paths must stay inside the folders")
        pairs.append(pair)
    return pairs


def _pairs_by_path(protected_dir: Path, clean_dir: Path) -> list[tuple[str, str]]:
    """Without a manifest: match files by relative path, ignoring the suffix."""
    clean = {str(e.relpath.with_suffix("")): str(e.relpath) for e in scan_folder(clean_dir, allow_outside=True).entries}
    pairs = []
    for entry in scan_folder(protected_dir, allow_outside=True).entries:
        stem = str(entry.relpath.with_suffix(""))
        if stem not in clean:
            raise ValueError(f"{entry.path} has no clean original in {clean_dir} (matched by relative path)")
        pairs.append((clean[stem], str(entry.relpath)))
    return pairs


def _read_small(path: Path, size: int) -> torch.Tensor:
    return _small(load_image(path).rgb, size)


def _small(rgb: np.ndarray, size: int) -> torch.Tensor:
    if rgb.shape[:2] != (size, size):
        rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def load_images(root: Path | str, *, size: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Every image under ``root`` (class subfolders or not) as uint8 (N, 3, size, size), and one
    message per file that could not be read (the rest are still used)."""
    images, problems = [], []
    for entry in scan_folder(Path(root)).entries:
        try:
            images.append(_read_small(entry.path, size))
        except ImageReadError as exc:
            problems.append(str(exc))
    if not images:
        raise ValueError(f"{root}: no readable images" + (f" ({problems[0]})" if problems else ""))
    return torch.stack(images), problems


def load_pairs(protected_dir: Path | str, clean_dir: Path | str, *, size: int = 32) -> tuple[ImageSet, ImageSet]:
    """The clean originals and their protected copies, aligned, labelled by the clean tree's
    first-level folders. Pairs come from ``manifest.jsonl`` (written by ``protect run``) or,
    without one, from matching relative paths. The largest difference of each pair is measured
    on the files themselves (``linf_levels`` of the protected set)."""
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
    clean_images, protected_images, labels, largest = [], [], [], 0
    for clean_rel, protected_rel in pairs:
        clean_path, protected_path = clean_dir / clean_rel, protected_dir / protected_rel
        if not clean_path.exists():
            raise ValueError(f"{protected_dir} and {clean_dir} do not match: {clean_rel} (in the manifest) is missing from {clean_dir}")
        if not protected_path.exists():
            raise ValueError(f"{protected_path} is listed in the manifest but missing")
        clean_rgb, protected_rgb = load_image(clean_path).rgb, load_image(protected_path).rgb
        if clean_rgb.shape != protected_rgb.shape:
            raise ValueError(f"{protected_path} is {protected_rgb.shape[1]}x{protected_rgb.shape[0]} but its original "
                             f"{clean_path} is {clean_rgb.shape[1]}x{clean_rgb.shape[0]}: not a protected copy of it")
        largest = max(largest, int(np.abs(clean_rgb.astype(np.int16) - protected_rgb).max(initial=0)))
        clean_images.append(_small(clean_rgb, size))
        protected_images.append(_small(protected_rgb, size))
        labels.append(index[labels_of[clean_rel]])
    label_tensor = torch.tensor(labels, dtype=torch.long)
    paths = [clean_rel for clean_rel, _ in pairs]
    return (
        ImageSet(torch.stack(clean_images), label_tensor, classes, paths),
        ImageSet(torch.stack(protected_images), label_tensor.clone(), classes, paths, linf_levels=largest),
    )


def clean_choice(n: int, clean_fraction: float, seed: int) -> torch.Tensor:
    """The positions (int64, random order) that a mix with ``clean_fraction`` of ``n`` images keeps clean."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    return torch.randperm(n, generator=gen)[: round(clean_fraction * n)]


def mix_with_clean(protected: ImageSet, clean: ImageSet, clean_fraction: float, seed: int) -> ImageSet:
    """Replace a random ``clean_fraction`` of the protected images by their clean originals
    (the two sets aligned image by image)."""
    chosen = clean_choice(len(protected), clean_fraction, seed)
    images = protected.images.clone()
    images[chosen] = clean.images[chosen]
    return ImageSet(images, protected.labels, protected.classes, protected.paths)


def clean_part(clean: ImageSet, clean_fraction: float, seed: int) -> ImageSet:
    """Only the images that :func:`mix_with_clean` keeps clean, in set order: what a scraper
    would have without the protected part, the baseline a mixed run is compared with."""
    return clean.take(clean_choice(len(clean), clean_fraction, seed).sort().values)

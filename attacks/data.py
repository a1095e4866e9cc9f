"""Labelled image folders as uint8 tensors, for training victims without per-sample Python."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from protect.images import load_image, scan_folder


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
        rgb = load_image(entry.path).rgb
        if rgb.shape[:2] != (size, size):
            rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))
        images.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1))
        labels.append(index[entry.label])
        paths.append(str(entry.relpath))
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.long), list(class_names), paths)

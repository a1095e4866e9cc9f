"""Image-text pairs to train a T2UE generator on: a labelled folder (captions from CLIP's
prompt templates over the class names) or a CSV/JSONL of image, caption records."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from protect.images import load_image, scan_folder
from protect.scale import working_tensor
from protect.t2ue.network import T2UEError

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
    # The runner's own resizing, so noise is fitted as it is applied.
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

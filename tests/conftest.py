"""Shared fixtures: tiny synthetic image folders and the optional shared CIFAR-10 copy."""

from __future__ import annotations

import os

# Set before anything imports huggingface / open_clip: tests never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
# Rich wraps long lines at the console width; keep CLI messages (with long tmp paths) on one line.
os.environ.setdefault("COLUMNS", "400")

import io
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
CIFAR10 = SHARED / "data" / "cifar10"

# Varied, non-square sizes (width, height), so resizing to and from the working resolution is exercised.
SIZES = [(20, 28), (40, 24), (33, 17), (24, 24)]


def synthetic_rgb(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth gradient plus noise, covering values near 0 and 255 (where clipping matters)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack(
        [xx / max(width - 1, 1), yy / max(height - 1, 1), (xx + yy) / max(width + height - 2, 1)], axis=2
    )
    phase = rng.uniform(0, 1, size=3)
    noisy = (base + phase) % 1.0 * 255 + rng.normal(0, 20, size=base.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    """Write a synthetic RGB image; the suffix picks the format (``.jpg`` is saved at quality 95)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(synthetic_rgb(width, height, seed), mode="RGB")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, format="JPEG", quality=95)
    else:
        image.save(path)
    return path


def write_exif_rotated_jpeg(path: Path, width: int = 30, height: int = 20) -> Path:
    """A JPEG stored ``width`` x ``height`` with EXIF orientation 6 (display rotated 90 CW).

    The left half is red and the right half blue, so the upright result can be checked."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (220, 20, 20)
    pixels[:, width // 2 :] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)
    return path


# ----------------------------------------------------------------------------------------------
# Bad inputs. Each maker writes one broken file into a folder and returns its path; the image tests
# check each alone, the pipeline tests put them all in one folder with good images.


def make_truncated_jpeg(folder: Path) -> Path:
    full = io.BytesIO()
    Image.fromarray(synthetic_rgb(64, 48, seed=1)).save(full, format="JPEG", quality=90)
    data = full.getvalue()
    path = folder / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    return path


def make_empty_png(folder: Path) -> Path:
    path = folder / "empty.png"
    path.write_bytes(b"")
    return path


def make_text_as_jpeg(folder: Path) -> Path:
    path = folder / "not_really.jpg"
    path.write_text("this is a text file, not a JPEG\n", encoding="utf-8")
    return path


def make_bomb_png(folder: Path) -> Path:
    """A PNG whose header says 20000x20000 (400 M pixels); 1-bit and blank, so ~50 kB on disk."""
    path = folder / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)
    assert path.stat().st_size < 1_000_000
    return path


def make_broken_symlink(folder: Path) -> Path:
    path = folder / "x.png"
    os.symlink(folder / "does-not-exist.png", path)
    return path


BAD_MAKERS = {
    "truncated-jpeg": make_truncated_jpeg,
    "zero-byte-png": make_empty_png,
    "text-named-jpg": make_text_as_jpeg,
    "decompression-bomb": make_bomb_png,
    "broken-symlink": make_broken_symlink,
}


@pytest.fixture
def make_images(tmp_path: Path) -> Callable[..., list[Path]]:
    """``make_images(name, classes=("cat", "dog"), per_class=3)`` -> written paths.

    Labelled (ImageFolder) layout under ``tmp_path/name/<class>/`` by default; ``classes=None``
    gives a flat folder of ``per_class`` images. PNG and JPEG alternate, sizes vary."""

    def make(
        name: str = "input",
        classes: tuple[str, ...] | None = ("cat", "dog"),
        per_class: int = 3,
        seed: int = 0,
    ) -> list[Path]:
        root = tmp_path / name
        root.mkdir(parents=True, exist_ok=True)
        paths = []
        folders = [root / c for c in classes] if classes else [root]
        counter = seed * 1000
        for folder in folders:
            for i in range(per_class):
                width, height = SIZES[counter % len(SIZES)]
                suffix = ".png" if counter % 2 == 0 else ".jpg"
                paths.append(write_image(folder / f"img{i:02d}{suffix}", width, height, counter))
                counter += 1
        return paths

    return make


@pytest.fixture
def cifar_root() -> Path:
    """The shared CIFAR-10 ImageFolder copy (``train/`` and ``test/``), or skip."""
    if not (CIFAR10 / "train").is_dir() or not (CIFAR10 / "test").is_dir():
        pytest.skip("../shared/data/cifar10 not found: the real-data test needs the shared CIFAR-10 folder")
    return CIFAR10


# On 1,000 images the official batch of 512 gives class noise only 2 PGD steps per round, and the
# surrogate memorises the set (reaching stop_error) before the noise is a shortcut; batches of
# 100 with steps of 2/255 give the noise 10 steps a round. The fit reaches stop_error in about
# 13 rounds (float32); max_rounds caps the fit time.
SMALL_SET_EM_OVERRIDES = {"batch_size": 100, "step_size": "2/255", "max_rounds": 20}


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The first 100 train images per class (symlinks), protected once with em-classwise and
    with the random control, plus the first 50 test images per class; shared by the real-data
    tests so the noise is fitted only once per session."""
    if not (CIFAR10 / "train").is_dir() or not (CIFAR10 / "test").is_dir():
        pytest.skip("../shared/data/cifar10 not found: the real-data test needs the shared CIFAR-10 folder")
    from protect.runner import protect_folder

    root = tmp_path_factory.mktemp("cifar-small")

    def subset(split: str, per_class: int) -> Path:
        for class_dir in sorted(p for p in (CIFAR10 / split).iterdir() if p.is_dir()):
            (root / split / class_dir.name).mkdir(parents=True)
            for path in sorted(class_dir.iterdir())[:per_class]:
                os.symlink(path, root / split / class_dir.name / path.name)
        return root / split

    clean, test = subset("train", 100), subset("test", 50)
    em = protect_folder("em-classwise", clean, root / "em", overrides=SMALL_SET_EM_OVERRIDES, seed=0, allow_outside=True)
    control = protect_folder("random", clean, root / "random", seed=0, allow_outside=True)
    assert em.exit_code == 0 and control.exit_code == 0
    return {"clean": clean, "test": test, "em": root / "em", "random": root / "random", "em_fit_seconds": em.fit_seconds}

"""The protected copies themselves, pinned: what `protect run` and `protect batch` write must not
change when the code around them is reorganised.

What can be compared bit for bit on any machine: the ``random`` method draws its noise from a
seeded generator and every later step is elementwise float arithmetic followed by rounding to
8-bit levels, so on 32 x 32 CIFAR images (no resampling between the working resolution and the
image) the written pixels are the same on every CPU. Those digests were measured before `run`
and `batch` became one runner, and are pinned here. Fitted methods (error-minimising noise and
the rest) run float optimisations whose last bits depend on the CPU's vector width and on bf16
support, and bilinear resampling of the noise to a photo's size can round differently where
the compiler fuses multiply-adds differently, so for the sample photos the test checks the
runner against the same computation done directly (noise rows in path order from one seeded
generator, mapped to each image's size), not against stored bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR10
from protect.budget import apply_perturbation_uint8, project_to_valid
from protect.images import load_image, scan_folder
from protect.runner import MANIFEST_NAME, PROTECTION_NAME, protect_export, protect_folder
from protect.runner.unit import unit_seed
from protect.scale import to_image_size, working_tensor

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
EPS = 8 / 255

# sha256 (first 16 hex digits) over every output image: its path, mode, size and pixels.
# `protect run random` and `protect batch random --unit-size 64 --workers 1`, seed 0, on the
# first 20 train images of every CIFAR-10 class.
PINNED_CIFAR = {"run": "ae617b1bb1551124", "batch": "2769ac0a6cb1101b"}


def pixel_digest(root: Path) -> str:
    digest = hashlib.sha256()
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST_NAME, PROTECTION_NAME))
    for path in images:
        with Image.open(path) as image:
            digest.update(path.relative_to(root).as_posix().encode() + image.mode.encode() + str(image.size).encode())
            digest.update(np.asarray(image).tobytes())
    return digest.hexdigest()[:16]


def cifar_subset(root: Path, per_class: int) -> Path:
    if not (CIFAR10 / "train").is_dir():
        pytest.skip("../shared/data/cifar10 not found: the pinned CIFAR outputs need the shared CIFAR-10 folder")
    for class_dir in sorted(p for p in (CIFAR10 / "train").iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.iterdir())[:per_class]:
            os.symlink(path, root / class_dir.name / path.name)
    return root


def test_random_on_a_cifar_subset_matches_the_pinned_bytes(tmp_path: Path) -> None:
    source = cifar_subset(tmp_path / "cifar", 20)
    protect_folder("random", source, tmp_path / "run", seed=0, allow_outside=True)  # the subset links to ../shared
    protect_export("random", source, tmp_path / "batch", seed=0, unit_size=64, workers=1, allow_outside=True)
    assert {"run": pixel_digest(tmp_path / "run"), "batch": pixel_digest(tmp_path / "batch")} == PINNED_CIFAR


def expected_random(images: list[Path], seed: int) -> dict[str, np.ndarray]:
    """What ``random`` writes for ``images`` fitted together with ``seed``, computed directly."""
    loaded = [load_image(path) for path in images]
    small = torch.stack([working_tensor(image, 32) for image in loaded]).float().div(255)
    noise = (torch.rand(small.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * EPS
    deltas = project_to_valid(small, noise, EPS)
    return {
        path.name: apply_perturbation_uint8(image.rgb, to_image_size(delta, *image.size), EPS)
        for path, image, delta in zip(images, loaded, deltas)
    }


@pytest.mark.parametrize("folder", ["labelled", "flat"])
def test_random_on_the_samples_is_the_direct_computation(folder: str, tmp_path: Path) -> None:
    source = SAMPLES / folder
    entries = scan_folder(source).entries
    protect_folder("random", source, tmp_path / "run", seed=3)
    protect_export("random", source, tmp_path / "batch", seed=3, unit_size=4, workers=1)
    whole = expected_random([e.path for e in entries], seed=3)
    units = [entries[start : start + 4] for start in range(0, len(entries), 4)]
    per_unit = {k: v for i, unit in enumerate(units) for k, v in expected_random([e.path for e in unit], unit_seed(3, i)).items()}
    for entry in entries:
        written = entry.relpath.with_suffix(".png").as_posix()
        assert np.array_equal(load_image(tmp_path / "run" / written).rgb, whole[entry.path.name]), written
        assert np.array_equal(load_image(tmp_path / "batch" / written).rgb, per_unit[entry.path.name]), written

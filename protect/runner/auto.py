"""Where a job applies the settings chosen from the folder (:mod:`protect.autoset`).

- from the images' size (the working resolution): before the fit reads the images at it, from
  the first :data:`PEEK_IMAGES` readable images of the source;
- from the fit set (batch size, step size, stopping rule): once its images and labels are
  known, for a fit of the whole folder, a fit on a sample of an export, or a unit's own fit.

A saved protector brings its own config, so nothing is chosen when one is reused.
"""

from __future__ import annotations

from typing import Any, Iterable

from protect.autoset import FolderFacts, choose_settings, describe_choices
from protect.generator import Generator
from protect.images import LoadedImage
from protect.progress import Reporter
from protect.runner.labels import FitLabels
from protect.scale import median_shorter_side

#: images whose size decides the rules that read the images' size
PEEK_IMAGES = 16

AutoRecord = dict[str, dict[str, Any]]


def wants_size(generator: Generator, fixed: Iterable[str]) -> bool:
    """Whether a rule of ``generator`` reads the images' size and the user left its key alone."""
    fixed = set(fixed)
    return any(s.from_size and s.key not in fixed for s in generator.auto_settings)


def peeked_side(images: Iterable[LoadedImage]) -> int | None:
    """The median shorter side of the first :data:`PEEK_IMAGES` of ``images``."""
    sizes = []
    for image in images:
        sizes.append(image.size)
        if len(sizes) == PEEK_IMAGES:
            break
    return median_shorter_side(sizes)


def size_choices(
    generator: Generator, config: dict[str, Any], fixed: Iterable[str], side: int | None
) -> tuple[dict[str, Any], AutoRecord]:
    """``config`` with the rules that read the images' size applied."""
    return choose_settings(generator.auto_settings, config, FolderFacts(side=side), fixed, from_size=True)


def fit_choices(
    generator: Generator, config: dict[str, Any], fixed: Iterable[str], images: int, labels: FitLabels | None,
    side: int | None,
) -> tuple[dict[str, Any], AutoRecord]:
    """``config`` with the rules that read the fit set applied: ``images`` in it, the classes
    of its ``labels`` (None: fitted without labels)."""
    classes = None
    if labels is not None and labels.labels is not None:
        classes = len(labels.classes) or int(labels.labels.max()) + 1
    facts = FolderFacts(images=images, classes=classes, side=side)
    return choose_settings(generator.auto_settings, config, facts, fixed, from_size=False)


def report_choices(generator: Generator, record: AutoRecord, reporter: Reporter, where: str = "") -> None:
    if record:
        reporter.message(
            f"{generator.name}{where}: settings chosen for these images: {describe_choices(generator.auto_settings, record)}; "
            "--set KEY=VALUE fixes any of them", "info",
        )

"""Victims that label the data their own way (``protect verify --relabel``).

Whoever scrapes protected images rarely uses the protector's labels. A relabelling replaces
the labels of every training set and of the test set consistently, so clean, control and
protected victims are still compared on one task:

- ``true``: the clean folders' class names (the default);
- ``coarse:FILE``: groups of classes from a YAML file ``groups: {name: [class, ...]}``, or
  ``coarse:NAME`` for one shipped in ``configs/relabel/NAME.yaml`` (``cifar10-coarse``:
  animals vs vehicles);
- ``kmeans[:K]``: K clusters (default 10) of the clean training images' features (this
  project's small CNN, randomly initialised, standardised per dimension); each test image takes
  the label of its nearest centre. No class names are used.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from attacks.data import ImageSet
from protect.cluster import kmeans, surrogate_features
from protect.config import packaged_config

RELABEL_CHOICES = "true, coarse:FILE (or coarse:NAME of configs/relabel/NAME.yaml) or kmeans[:K]"


class RelabelError(ValueError):
    """The relabelling spec or its file is invalid; the message says which and why."""


def describe(spec: str) -> str:
    """What the victims' labels are, in words, for the report."""
    kind, _, arg = spec.partition(":")
    if kind == "coarse":
        return f"coarse groups of the true classes from {arg}"
    if kind == "kmeans":
        return f"k-means pseudo-labels (K={arg or 10}) of random small-CNN features of the clean images"
    return "the true labels (the clean folders' class names)"


def parse_spec(spec: str | None) -> str:
    """A checked spec ("true", "coarse:FILE" or "kmeans:K")."""
    spec = (spec or "true").strip()
    kind, _, arg = spec.partition(":")
    if kind == "true" and not arg:
        return "true"
    if kind == "coarse" and arg:
        _mapping_file(arg)
        return spec
    if kind == "kmeans":
        try:
            k = int(arg or 10)
        except ValueError:
            raise RelabelError(f"--relabel kmeans:K needs an integer K; got {arg!r}") from None
        if k < 2:
            raise RelabelError(f"--relabel kmeans:K needs K >= 2; got {k}")
        return f"kmeans:{k}"
    raise RelabelError(f"unknown --relabel {spec!r}; choose {RELABEL_CHOICES}")


def _mapping_file(arg: str) -> Any:
    """The class-groups file of ``coarse:ARG``: a file, else ``configs/relabel/ARG.yaml``."""
    if Path(arg).is_file():
        return Path(arg)
    shipped = packaged_config(f"relabel/{arg}.yaml")
    if shipped.is_file():
        return shipped
    raise RelabelError(f"--relabel coarse: mapping file not found: {arg} (and no configs/relabel/{arg}.yaml is shipped)")


def coarse_groups(path: Path | str, classes: list[str]) -> tuple[list[str], dict[str, int]]:
    """Group names and, for every class, its group index; every class in exactly one group.
    ``path``: a YAML file, or the name of one shipped in ``configs/relabel/``."""
    path = _mapping_file(str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RelabelError(f"{path}: not valid YAML ({exc})") from None
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, dict) or len(groups) < 2:
        raise RelabelError(f"{path}: expected `groups: {{name: [class, ...], ...}}` with at least two groups")
    group_of: dict[str, int] = {}
    for index, members in enumerate(groups.values()):
        for name in members or []:
            if str(name) in group_of:
                raise RelabelError(f"{path}: class {name!r} is in two groups")
            group_of[str(name)] = index
    missing = [c for c in classes if c not in group_of]
    if missing:
        raise RelabelError(f"{path}: classes {', '.join(missing)} are in no group (the data has: {', '.join(classes)})")
    return [str(g) for g in groups], group_of


def _with_labels(images: ImageSet, labels: torch.Tensor, classes: list[str]) -> ImageSet:
    return replace(images, labels=labels, classes=classes)


def relabel_sets(
    spec: str, train_sets: list[ImageSet], test: ImageSet, *, seed: int = 0
) -> tuple[list[ImageSet], ImageSet]:
    """The training sets and the test set with the labels ``spec`` gives. ``train_sets[0]`` is
    the clean set; for ``kmeans`` the others must be aligned with it image by image (its
    clusters label them), for ``coarse`` each set's own classes are mapped."""
    kind, _, arg = parse_spec(spec).partition(":")
    if kind == "true":
        return train_sets, test
    clean = train_sets[0]
    if kind == "coarse":
        names, group_of = coarse_groups(arg, clean.classes)
        lookup = torch.tensor([group_of[c] for c in clean.classes])
        coarse_sets = [_with_labels(s, lookup[s.labels], names) for s in train_sets]
        return coarse_sets, _with_labels(test, lookup[test.labels], names)
    k = min(int(arg), len(clean))
    features = surrogate_features(torch.cat([clean.images, test.images]), surrogate="small-cnn",
                                  device=torch.device("cpu"), seed=seed)
    train_labels, centres = kmeans(features[: len(clean)], k, seed=seed)
    test_labels = torch.cdist(features[len(clean):], centres).argmin(dim=1)
    names = [f"cluster-{i}" for i in range(k)]
    return [_with_labels(s, train_labels.clone(), names) for s in train_sets], _with_labels(test, test_labels, names)

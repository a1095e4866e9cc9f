"""The one label policy of a job: which labels a fit uses.

- Every record has a label and there are at least two classes: the source's labels (classes
  sorted by name).
- Otherwise, for a method that needs labels: k-means pseudo-labels (``pseudo_label_k``
  clusters, at most one per image) on features learned from the images themselves
  (:func:`protect.cluster.pseudo_labels`), so a flat folder, a folder with one class subfolder
  or an export without a label column is still protected; the output says which features.
- Otherwise: no labels.

A fit that is kept to protect *later* images by class (class-wise noise fitted once for an
export, a saved protector) needs the source's own labels; :func:`source_classes` says whether
there are any.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from protect.cluster import PSEUDO_LABEL_FEATURES, pseudo_labels
from protect.generator import Generator
from protect.progress import NullReporter, Reporter


#: the feature extractors of pseudo-labels, as the output names them
FEATURES_IN_WORDS = {
    "patch-kmeans": "features learned from the images' own patches (Coates et al. 2011)",
    "random-cnn": "features of a randomly initialised small CNN",
}


@dataclass
class FitLabels:
    """Labels of a fit set: int64 (N,) or None; the class names behind them ([] for pseudo or
    none); ``source`` in words for the record of the run."""

    labels: torch.Tensor | None
    classes: list[str] = field(default_factory=list)
    source: str = "none"

    @property
    def pseudo(self) -> bool:
        return self.labels is not None and not self.classes


def source_classes(names: list[str | None]) -> list[str]:
    """The classes of a fit set when every record has a label and there are two or more, else []."""
    if not names or any(name is None for name in names):
        return []
    present = sorted(set(names))
    return present if len(present) >= 2 else []


def label_tensor(names: list[str | None], classes: list[str]) -> torch.Tensor:
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[name] for name in names], dtype=torch.long)


def labels_for_fit(
    names: list[str | None],
    images: torch.Tensor,
    generator: Generator,
    *,
    origin: str = "labels",
    reporter: Reporter | None = None,
    where: str = "",
) -> FitLabels:
    """The labels ``generator`` is fitted with on ``images`` (uint8 (N, 3, R, R)), whose
    source labels are ``names``; ``origin`` says where those come from ("folders")."""
    classes = source_classes(names)
    if classes:
        return FitLabels(label_tensor(names, classes), classes, f"{origin} ({len(classes)} classes)")
    if not generator.needs_labels:
        return FitLabels(None)
    k = min(generator.config.pseudo_label_k, len(images))
    features = FEATURES_IN_WORDS[PSEUDO_LABEL_FEATURES[0]]
    (reporter or NullReporter()).message(
        f"{where or 'the source'} has no labels with two classes or more: {generator.name} needs labels, so the "
        f"{len(images)} images are clustered into {k} pseudo-classes by k-means on {features}"
    )
    if k < 2:
        return FitLabels(torch.zeros(len(images), dtype=torch.long), source="pseudo (one image)")
    labels = pseudo_labels(images, k, surrogate=generator.config.surrogate, device=generator.device, seed=generator.seed)
    return FitLabels(labels, source=f"pseudo (k-means on {features}, k={k})")

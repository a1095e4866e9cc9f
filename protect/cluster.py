"""k-means clustering of feature vectors, and pseudo-labels for unlabelled folders.

Pseudo-labels are k-means clusters of image features. The features come from a feature
extractor learned on the folder itself, without labels and without downloads
(:func:`patch_dictionary_features`: a single-layer network whose filters are k-means centres
of whitened image patches, Coates, Lee & Ng, AISTATS 2011). A randomly initialised CNN
(:func:`surrogate_features`) is the other choice; its clusters follow the classes far less
(`benchmarks/p2_pseudo_labels.py` compares the two on Imagenette).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protect.models import build_classifier

#: feature extractors for pseudo-labels, by name (the first is the default)
PSEUDO_LABEL_FEATURES = ("patch-kmeans", "random-cnn")


def kmeans(
    features: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 100, random_start: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding (or, with ``random_start``, k distinct random
    points: the cheap start for large k), deterministic for ``seed``.

    features: float (N, D). Returns (assignments int64 (N,), centres float (k, D)).
    An emptied cluster is re-seeded with the point farthest from its centre.
    """
    x = features.float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points; got k={k}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(n, generator=gen)[:k]] if random_start else x[torch.randint(n, (1,), generator=gen)]
    for _ in range(len(centres), k):
        dist = torch.cdist(x, centres).min(dim=1).values.square()
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full_like(dist, 1.0 / n)
        centres = torch.cat([centres, x[torch.multinomial(probs, 1, generator=gen)]])
    assignments = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        dist = torch.cdist(x, centres)
        new = dist.argmin(dim=1)
        for c in range(k):
            members = new == c
            if members.any():
                centres[c] = x[members].mean(dim=0)
            else:
                far = dist.gather(1, new[:, None]).squeeze(1).argmax()
                centres[c] = x[far]
                new[far] = c
        if torch.equal(new, assignments):
            break
        assignments = new
    return assignments, centres


@torch.no_grad()
def surrogate_features(
    images: torch.Tensor, *, surrogate: str, device: torch.device, seed: int, batch_size: int = 512
) -> torch.Tensor:
    """Penultimate features of a freshly initialised surrogate (random convolutional features),
    standardised per dimension. images: uint8 (N, 3, R, R)."""
    model = build_classifier(surrogate, 1, seed=seed, device=device, channels_last=True).eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float().div(255)
        chunks.append(model.embed(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    feats = torch.cat(chunks)
    return (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)


def _normalised_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each patch (rows of (P, D) in [0, 1] units) less its mean, divided by its contrast; the
    regulariser (10 in 0-255 units, as Coates et al.) keeps flat patches from blowing up."""
    centred = patches - patches.mean(dim=1, keepdim=True)
    return centred / (centred.var(dim=1, keepdim=True) + 10 / 255**2).sqrt()


def _whitening(patches: torch.Tensor, eps: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """ZCA whitening (mean, matrix) of normalised patches."""
    mean = patches.mean(dim=0)
    covariance = torch.cov((patches - mean).T)
    values, vectors = torch.linalg.eigh(covariance)
    return mean, vectors @ torch.diag((values.clamp_min(0) + eps).rsqrt()) @ vectors.T


@torch.no_grad()
def patch_dictionary_features(
    images: torch.Tensor, *, seed: int = 0, atoms: int = 256, patch: int = 6, size: int = 32, samples: int = 20_000,
    chunk: int = 64,
) -> torch.Tensor:
    """Features of a single-layer network learned from the images themselves (Coates, Lee & Ng,
    "An Analysis of Single-Layer Networks in Unsupervised Feature Learning", AISTATS 2011):
    ``atoms`` k-means centres of whitened ``patch`` x ``patch`` patches at ``size`` px are the
    filters, each location is encoded by the triangle activation max(0, mean_k(z) - z_k) of its
    distances z to the centres, and the encodings are summed over the four image quadrants.
    Deterministic for ``seed``; labels are never read. images: uint8 (N, 3, R, R). Returns
    float (N, 4 * atoms), standardised per dimension."""
    gen = torch.Generator().manual_seed(seed)
    x = images.float().div(255)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    side = size - patch + 1
    picks = torch.randint(len(x) * side * side, (min(samples, len(x) * side * side),), generator=gen)
    rows = picks // (side * side)
    top, left = (picks % (side * side)) // side, picks % side
    offsets = torch.arange(patch)
    sampled = x[rows[:, None, None, None], torch.arange(3)[None, :, None, None],
                (top[:, None] + offsets)[:, None, :, None], (left[:, None] + offsets)[:, None, None, :]]
    sampled = _normalised_patches(sampled.flatten(1))
    mean, whiten = _whitening(sampled)
    _, centres = kmeans((sampled - mean) @ whiten, min(atoms, len(sampled)), seed=seed, iterations=10, random_start=True)
    encoded = []
    for start in range(0, len(x), chunk):
        block = F.unfold(x[start : start + chunk], patch)  # (n, 3 * patch * patch, side * side)
        n = block.shape[0]
        z = torch.cdist((_normalised_patches(block.transpose(1, 2).flatten(0, 1)) - mean) @ whiten, centres)
        activation = (z.mean(dim=1, keepdim=True) - z).clamp_min(0).view(n, side, side, -1)
        half = side // 2
        quadrants = [activation[:, :half, :half], activation[:, :half, half:], activation[:, half:, :half], activation[:, half:, half:]]
        encoded.append(torch.cat([q.sum(dim=(1, 2)) for q in quadrants], dim=1))
    feats = torch.cat(encoded)
    return (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)


def pseudo_label_features(
    images: torch.Tensor, extractor: str, *, surrogate: str, device: torch.device, seed: int
) -> torch.Tensor:
    """Features to cluster into pseudo-labels, by the name of their extractor
    (:data:`PSEUDO_LABEL_FEATURES`). images: uint8 (N, 3, R, R)."""
    if extractor == "patch-kmeans":
        return patch_dictionary_features(images, seed=seed)
    if extractor == "random-cnn":
        return surrogate_features(images, surrogate=surrogate, device=device, seed=seed)
    raise ValueError(f"unknown pseudo-label features {extractor!r}; available: {', '.join(PSEUDO_LABEL_FEATURES)}")


def pseudo_labels(
    images: torch.Tensor, k: int, *, surrogate: str, device: torch.device, seed: int,
    extractor: str = PSEUDO_LABEL_FEATURES[0],
) -> torch.Tensor:
    """k-means pseudo-labels for an unlabelled set (k capped at the number of images), on the
    features of ``extractor``."""
    feats = pseudo_label_features(images, extractor, surrogate=surrogate, device=device, seed=seed)
    assignments, _ = kmeans(feats, min(k, len(images)), seed=seed)
    return assignments


def cluster_quality(assignments: torch.Tensor, labels: torch.Tensor) -> dict[str, object]:
    """How well clusters follow known labels (for reports only; no method reads labels this way).

    purity: the fraction of items whose cluster's most common label is their own; nmi:
    normalised mutual information with the arithmetic-mean normalisation (scikit-learn's
    default), 0 for independent, 1 for identical partitions; per cluster: size, majority label
    and its share. assignments, labels: int64 (N,)."""
    assignments, labels = assignments.long().cpu(), labels.long().cpu()
    clusters, classes = int(assignments.max()) + 1, int(labels.max()) + 1
    counts = torch.zeros(clusters, classes, dtype=torch.float64)
    counts.index_put_((assignments, labels), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    joint = counts / counts.sum()
    p_cluster, p_class = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = (joint[nonzero] * (joint[nonzero] / (p_cluster[:, None] * p_class[None, :])[nonzero]).log()).sum()

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p[p > 0] * p[p > 0].log()).sum()

    normaliser = (entropy(p_cluster) + entropy(p_class)) / 2
    sizes = counts.sum(1)
    majority = counts.max(1)
    return {
        "purity": round(float(majority.values.sum() / counts.sum()), 4),
        "nmi": round(float(mutual / normaliser) if normaliser > 0 else 1.0, 4),
        "clusters": [
            {"size": int(size), "majority_label": int(label), "majority_share": round(float(share / size), 3)}
            for size, label, share in zip(sizes.tolist(), majority.indices.tolist(), majority.values.tolist())
            if size > 0
        ],
    }

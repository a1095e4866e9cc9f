"""k-means clustering of feature vectors, and pseudo-labels for unlabelled folders."""

from __future__ import annotations

import torch

from protect.models import build_classifier


def kmeans(
    features: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding, deterministic for ``seed``.

    features: float (N, D). Returns (assignments int64 (N,), centres float (k, D)).
    An emptied cluster is re-seeded with the point farthest from its centre.
    """
    x = features.float()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points; got k={k}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=gen)]
    for _ in range(1, k):
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


def pseudo_labels(
    images: torch.Tensor, k: int, *, surrogate: str, device: torch.device, seed: int
) -> torch.Tensor:
    """k-means pseudo-labels for an unlabelled set (k capped at the number of images)."""
    feats = surrogate_features(images, surrogate=surrogate, device=device, seed=seed)
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

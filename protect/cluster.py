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

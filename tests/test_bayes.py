"""The Bayes-error method: the estimator against a brute-force computation, the ascent, and a fit
on real data. Its effect on victims (with clean data mixed in) is measured by
``benchmarks/p0.py``, not here: see the README."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from protect.budget import budget_in_levels
from protect.generator import create_generator, resolve_config
from protect.methods.bayes import (
    bayes_error,
    bayes_error_ascent,
    embed_normalised,
    estimate_bayes_error,
    loo_class_posteriors,
)
from protect.runner import protect_folder
from protect.surrogates import build_surrogate


def brute_force_posteriors(features: torch.Tensor, labels: torch.Tensor, classes: int, bandwidth: float) -> torch.Tensor:
    """The estimator written out in full: an N x N kernel with a zero diagonal."""
    n = len(features)
    kernel = torch.exp(-torch.cdist(features, features).square() / (2 * bandwidth**2)) * (1 - torch.eye(n))
    return kernel @ F.one_hot(labels, classes).double() / kernel.sum(1, keepdim=True)


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_estimator_matches_brute_force_in_value_and_gradient(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n, dim, classes, bandwidth = 40, 6, 3, 0.9
    features = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=gen)
    anchor_index = torch.tensor([0, 5, 6, 17, 39])

    anchors = features[anchor_index].float().requires_grad_(True)
    posteriors = loo_class_posteriors(anchors, anchor_index, features.float(), labels, classes, bandwidth, chunk_size)
    estimate = bayes_error(posteriors)
    estimate.backward()

    # Brute force: the anchors are the variables; every other image is a constant.
    live = features[anchor_index].clone().requires_grad_(True)
    everything = features.index_put((anchor_index,), live)
    expected_posteriors = brute_force_posteriors(everything, labels, classes, bandwidth)[anchor_index]
    expected = bayes_error(expected_posteriors)
    expected.backward()

    torch.testing.assert_close(posteriors.double(), expected_posteriors, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(estimate.double(), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(anchors.grad.double(), live.grad, atol=1e-5, rtol=1e-3)
    assert posteriors.sum(1).sub(1).abs().max() < 1e-5


def test_whole_set_estimate_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(50, 4, generator=gen)
    labels = torch.randint(0, 4, (50,), generator=gen)
    got = estimate_bayes_error(features, labels, 4, 1.2, batch_size=16, chunk_size=9)
    expected = bayes_error(brute_force_posteriors(features.double(), labels, 4, 1.2))
    assert got == pytest.approx(float(expected), abs=1e-5)


def test_estimate_is_zero_for_separated_classes_and_high_for_mixed_ones() -> None:
    """The estimator means what it says: far-apart classes have no Bayes error; identical ones
    have about the maximum 1 - 1/C."""
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(60) % 3
    separated = F.one_hot(labels, 3).float() * 10 + 0.01 * torch.randn(60, 3, generator=gen)
    mixed = torch.randn(60, 3, generator=gen)
    assert estimate_bayes_error(separated, labels, 3, 1.0) < 1e-3
    assert estimate_bayes_error(mixed, labels, 3, 5.0) > 0.6


def test_ascent_raises_the_estimate_monotonically_within_the_budget() -> None:
    gen = torch.Generator().manual_seed(3)
    n, eps = 24, 8 / 255
    labels = torch.arange(n) % 2
    # Two classes a surrogate can tell apart: bright vs dark images with texture.
    images = (0.3 + 0.4 * labels.float()).view(n, 1, 1, 1) + 0.1 * torch.rand(n, 3, 16, 16, generator=gen)
    model = build_surrogate("small-cnn", 2, seed=0).eval().requires_grad_(False)
    no_autocast = torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        bank = embed_normalised(model, images, no_autocast)
    index = torch.arange(n)

    delta, history = bayes_error_ascent(
        model, images, index, torch.zeros_like(images), bank, labels,
        num_classes=2, steps=8, step_size=0.25 / 255, eps=eps, bandwidth=0.5, chunk_size=10, autocast=no_autocast,
    )

    assert all(later >= earlier - 1e-6 for earlier, later in zip(history, history[1:])), history
    assert history[-1] > history[0]
    assert delta.abs().max() <= eps + 1e-6
    assert (images + delta).min() >= 0 and (images + delta).max() <= 1


def test_same_seed_same_noise() -> None:
    config = resolve_config("bayes", overrides={"rounds": 1, "warmup_epochs": 1, "steps": 2, "resolution": 16})
    images = torch.randint(0, 256, (12, 3, 16, 16), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    labels = torch.arange(12) % 3
    noises = []
    for _ in range(2):
        generator = create_generator("bayes", config, seed=7)
        generator.fit(images, labels)
        noises.append(generator.state_dict()["noise"])
    assert torch.equal(noises[0], noises[1])
    assert noises[0].abs().max() > 0


@pytest.mark.slow
def test_fit_on_real_images_raises_the_bayes_error_and_keeps_the_budget(cifar_root, tmp_path) -> None:
    """200 CIFAR-10 images through `protect run bayes`: every round ends with a higher estimate
    than it started with, and the written files respect the budget."""
    source = tmp_path / "clean"
    for class_dir in sorted(p for p in (cifar_root / "train").iterdir() if p.is_dir())[:4]:
        (source / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.iterdir())[:50]:
            (source / class_dir.name / path.name).symlink_to(path)
    overrides = {"batch_size": 50, "rounds": 2, "warmup_epochs": 5, "steps": 5}

    summary = protect_folder("bayes", source, tmp_path / "protected", overrides=overrides, seed=0, allow_outside=True)

    assert summary.exit_code == 0 and summary.written == 200
    assert summary.max_levels <= budget_in_levels(8 / 255)
    fit = json.loads((tmp_path / "protected" / "protection.json").read_text())["fit"]
    assert fit["rounds_run"] == 2
    for round_estimates in fit["estimated_bayes_error"]:
        assert round_estimates["after"] > round_estimates["before"] + 0.02, fit

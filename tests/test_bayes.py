"""The Bayes-error method: the analytic full-set gradient against autograd through a brute-force
N x N estimator, the fresh seeded surrogate of every outer step, the budget after every step,
resuming an interrupted fit, and a fit on real data. Its effect on victims mixed with clean data
is measured by ``benchmarks/p0_mix.py`` (docs/methods/bayes.md), not here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from protect.budget import budget_in_levels
from protect.generator import create_generator, resolve_config
from protect.methods import bayes
from protect.methods.bayes import (
    BayesErrorMaximising,
    bayes_error_gradient,
    estimate_bayes_error,
    scale_by_max_abs,
    scaled_bayes_error_gradient,
)
from protect.progress import NullReporter
from protect.runner import STATE_DIR_NAME, protect_folder
from protect.training_state import CheckpointError

TINY = {"steps": 3, "surrogate_epochs": 2, "resolution": 16, "batch_size": 16}


def brute_force_bayes_error(features: torch.Tensor, labels: torch.Tensor, classes: int, sigma: float) -> torch.Tensor:
    """The estimator written out in full, differentiable: an N x N kernel with a zero diagonal."""
    n = len(features)
    squared = (features[:, None] - features[None]).square().sum(-1)
    kernel = torch.exp(-squared / (2 * sigma**2)) * (1 - torch.eye(n, dtype=features.dtype))
    posteriors = kernel @ F.one_hot(labels, classes).to(features.dtype) / kernel.sum(1, keepdim=True)
    return (1 - posteriors.max(1).values).mean()


def _features(seed: int, n: int = 40, dim: int = 6, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("chunk_size", [1, 7, 40, 64])
def test_analytic_full_set_gradient_equals_autograd_through_the_brute_force_estimator(chunk_size: int) -> None:
    features, labels = _features(0)
    live = features.clone().requires_grad_(True)
    expected = brute_force_bayes_error(live, labels, 3, 0.9)
    expected.backward()

    estimate, grad = bayes_error_gradient(features, labels, 3, 0.9, chunk_size=chunk_size)
    no_grad_estimate, none = bayes_error_gradient(features, labels, 3, 0.9, chunk_size=chunk_size, with_gradient=False)

    torch.testing.assert_close(estimate, expected.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, live.grad, atol=1e-12, rtol=1e-9)
    assert none is None and float(no_grad_estimate) == pytest.approx(float(estimate), abs=1e-12)


def test_the_gradient_includes_each_images_effect_on_the_other_posteriors() -> None:
    """Holding every other image fixed (each image's own posterior only) gives another gradient."""
    features, labels = _features(0)
    _, full = bayes_error_gradient(features, labels, 3, 0.9)
    own_only = torch.zeros_like(features)
    onehot = F.one_hot(labels, 3).double()
    for i in range(len(features)):
        anchor = features[i].clone().requires_grad_(True)
        squared = (anchor - features).square().sum(-1).index_fill(0, torch.tensor([i]), float("inf"))
        posterior = torch.softmax(-squared / (2 * 0.9**2), dim=0) @ onehot
        (1 - posterior.max()).div(len(features)).backward()
        own_only[i] = anchor.grad
    assert (own_only - full).abs().max() > 0.1 * full.abs().max()


@pytest.mark.parametrize("chunk_size", [3, 16])
def test_gradient_through_the_global_max_abs_scale_and_sigma_03(chunk_size: int) -> None:
    features, labels = _features(1, n=30, dim=5, classes=4)
    features = features.abs() * 3  # non-negative like post-activation features, on an arbitrary scale
    live = features.clone().requires_grad_(True)
    expected = brute_force_bayes_error(scale_by_max_abs(live), labels, 4, 0.3)
    expected.backward()

    estimate, grad = scaled_bayes_error_gradient(features.float(), labels, 4, 0.3, chunk_size=chunk_size)

    assert estimate == pytest.approx(float(expected.detach()), abs=1e-5)
    torch.testing.assert_close(grad.double(), live.grad, atol=1e-5, rtol=1e-3)
    assert estimate_bayes_error(features * 7, labels, 4, 0.3, chunk_size=chunk_size) == pytest.approx(estimate, abs=1e-5)


def test_estimate_is_zero_for_separated_classes_and_high_for_mixed_ones() -> None:
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(60) % 3
    separated = F.one_hot(labels, 3).float() * 10 + 0.01 * torch.randn(60, 3, generator=gen)
    mixed = torch.randn(60, 3, generator=gen)
    assert estimate_bayes_error(separated, labels, 3, 0.3) < 1e-3
    assert estimate_bayes_error(mixed, labels, 3, 5.0) > 0.6


def _tiny_set(n: int = 24, size: int = 16, seed: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by brightness, with pure black and white pixels so that the
    [0, 1] range is binding as well as the eps ball."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = (labels.view(n, 1, 1, 1) * 80 + torch.randint(0, 96, (n, 3, size, size), generator=gen)).clamp(0, 255)
    images[:, :, 0, :] = 0
    images[:, :, -1, :] = 255
    return images.to(torch.uint8), labels


def test_every_outer_step_trains_a_fresh_surrogate_seeded_from_job_seed_and_step() -> None:
    images, labels = _tiny_set()
    protected = images.float() / 255
    generator = create_generator("bayes", resolve_config("bayes", overrides=TINY), seed=7)

    def weights(step: int, job_seed: int = 7) -> list[torch.Tensor]:
        generator.seed = job_seed
        return [p.detach().clone() for p in generator.fresh_surrogate(step, protected, labels, 3).parameters()]

    first, again = weights(2), weights(2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, weights(3)))
    assert not all(torch.equal(a, b) for a, b in zip(first, weights(2, job_seed=8)))


def test_budget_holds_after_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _tiny_set()
    x = images.float() / 255
    eps = 8 / 255
    seen = []
    real_step = BayesErrorMaximising._outer_step

    def checked_step(self, step, x_all, y, n_classes, delta, optimizer, reporter):
        record = real_step(self, step, x_all, y, n_classes, delta, optimizer, reporter)
        noise = delta.detach()
        assert noise.abs().max() <= eps + 1e-7, step
        assert (x + noise).min() >= 0 and (x + noise).max() <= 1, step
        seen.append(float(noise.abs().max()))
        return record

    monkeypatch.setattr(BayesErrorMaximising, "_outer_step", checked_step)
    # a learning rate of eps / 2 reaches the edge of the ball within the three steps
    config = resolve_config("bayes", overrides={**TINY, "noise_lr": 4 / 255})
    generator = create_generator("bayes", config, seed=1)
    generator.fit(images, labels)

    assert len(seen) == 3 and seen[-1] == pytest.approx(eps, abs=1e-6)
    summary = generator.fit_summary()
    assert summary["steps_run"] == 3
    assert set(summary["steps"][0]) >= {"before", "after", "surrogate_clean_accuracy", "seconds"}


class _StopAtStep(NullReporter):
    """Interrupts a fit as the outer step with this (1-based) number begins."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def phase(self, title: str, total: int | None):
        if title.startswith(f"bayes: step {self.step}/"):
            raise KeyboardInterrupt
        return super().phase(title, total)


def test_resume_after_an_interrupted_fit_gives_identical_noise(tmp_path: Path) -> None:
    images, labels = _tiny_set()
    config = resolve_config("bayes", overrides=TINY)
    whole = create_generator("bayes", config, seed=3)
    whole.fit(images, labels)

    interrupted = create_generator("bayes", config, seed=3)
    interrupted.fit_checkpoint_dir = tmp_path
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(images, labels, _StopAtStep(3))
    resumed = create_generator("bayes", config, seed=3)
    resumed.fit_checkpoint_dir = tmp_path
    reporter = NullReporter()
    resumed.fit(images, labels, reporter)

    assert any("resuming after outer step 2 of 3" in text for _, text in reporter.messages)
    assert torch.equal(resumed.noise, whole.noise)
    assert [s["after"] for s in resumed.history] == [s["after"] for s in whole.history]
    # progress of another fit (here: another seed) is refused, not continued
    other = create_generator("bayes", config, seed=4)
    other.fit_checkpoint_dir = tmp_path
    with pytest.raises(CheckpointError, match="another training"):
        other.fit(images, labels)


def test_protect_run_resume_continues_an_interrupted_fit(make_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_images("input", classes=("cat", "dog"), per_class=4)
    source, overrides = tmp_path / "input", {**TINY, "steps": 2}
    protect_folder("bayes", source, tmp_path / "whole", overrides=overrides, seed=5)
    steps_run = []
    real_step = BayesErrorMaximising._outer_step

    def counted_step(self, step, *args):
        steps_run.append(step)
        return real_step(self, step, *args)

    monkeypatch.setattr(BayesErrorMaximising, "_outer_step", counted_step)
    with pytest.raises(KeyboardInterrupt):
        protect_folder("bayes", source, tmp_path / "resumed", overrides=overrides, seed=5, reporter=_StopAtStep(2))
    assert (tmp_path / "resumed" / STATE_DIR_NAME / "fit-progress" / f"{bayes.CHECKPOINT_STEM}.json").exists()

    protect_folder("bayes", source, tmp_path / "resumed", overrides=overrides, seed=5, resume=True)

    assert steps_run == [0, 1, 1]  # step 2 interrupted as it began and run on resume; step 1 not again
    written = {p.relative_to(tmp_path / "whole"): p.read_bytes() for p in (tmp_path / "whole").rglob("*.png")}
    assert written and all((tmp_path / "resumed" / rel).read_bytes() == data for rel, data in written.items())
    assert not (tmp_path / "resumed" / STATE_DIR_NAME).exists()


@pytest.mark.slow
def test_fit_on_real_images_raises_the_estimate_every_step_and_keeps_the_budget(cifar_root, tmp_path) -> None:
    """200 CIFAR-10 images through `protect run bayes`: each outer step raises the estimate on
    its own fresh surrogate, and the written files respect the budget."""
    source = tmp_path / "clean"
    for class_dir in sorted(p for p in (cifar_root / "train").iterdir() if p.is_dir())[:4]:
        (source / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.iterdir())[:50]:
            (source / class_dir.name / path.name).symlink_to(path)
    overrides = {"batch_size": 50, "steps": 3, "surrogate_epochs": 4, "noise_lr": 2 / 255}

    summary = protect_folder("bayes", source, tmp_path / "protected", overrides=overrides, seed=0, allow_outside=True)

    assert summary.exit_code == 0 and summary.written == 200
    assert summary.max_levels <= budget_in_levels(8 / 255)
    fit = json.loads((tmp_path / "protected" / "protection.json").read_text())["fit"]
    assert fit["steps_run"] == 3
    for step in fit["steps"]:
        assert step["after"] > step["before"], fit

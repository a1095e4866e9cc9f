"""Error-minimising noise: the fast path (early exit, stop criterion scored during PGD) against
the paper's loop on tiny sets; budgets, stopping and the early-exit rule."""

from __future__ import annotations

import torch
import torch.nn as nn

from protect.generator import create_generator, resolve_config
from protect.methods.error_minimising import min_min_pgd, surrogate_loss

EPS = 8 / 255
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def tiny_set(n_per_class: int = 8, classes: int = 3, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images, each class with its own mean colour, so a surrogate can learn them."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    tint = torch.rand(classes, 3, 1, 1, generator=gen)[labels]
    images = (0.5 * tint + 0.5 * torch.rand(len(labels), 3, size, size, generator=gen)) * 255
    return images.round().to(torch.uint8), labels


def fitted(images: torch.Tensor, labels: torch.Tensor, **overrides):
    settings = {"resolution": images.shape[-1], "batch_size": 16, "precision": "fp32", "max_rounds": 8,
                "stop_error": 0.0, **overrides}
    generator = create_generator("em-samplewise", resolve_config("em-samplewise", overrides=settings), seed=3)
    generator.fit(images, labels)
    return generator


def test_fast_path_without_exits_is_the_paper_loop() -> None:
    """exit_loss 0 never exits: the same noise, rounds and stopping as fast=false, with the
    stop criterion scored during PGD instead of by a separate error pass."""
    images, labels = tiny_set()
    paper = fitted(images, labels, fast=False, steps=4)
    fast = fitted(images, labels, fast=True, exit_loss=0.0, fast_steps=4, fast_step_size="0.8/255")
    assert fast.fit_summary()["rounds_run"] == paper.fit_summary()["rounds_run"]
    assert fast.final_error == paper.final_error and fast.converged == paper.converged
    assert torch.allclose(fast.noise, paper.noise, atol=1e-6)
    assert "error" in paper.phase_seconds and "error" not in fast.phase_seconds


def test_fast_and_paper_paths_stay_in_budget_and_stop_alike() -> None:
    images, labels = tiny_set()
    runs = {fast: fitted(images, labels, fast=fast, steps=6, fast_steps=6, fast_step_size="0.8/255", stop_error=0.05)
            for fast in (False, True)}
    for run in runs.values():
        assert run.converged and run.final_error <= 0.05
        assert run.noise.abs().max() <= EPS + 1e-7
    # Early exits cut the work; the criterion, and the rounds it took to meet it, do not change.
    assert runs[True].image_steps < runs[False].image_steps
    assert abs(runs[True].rounds_run - runs[False].rounds_run) <= 1


def test_the_fast_path_takes_its_own_schedule_and_the_paper_path_the_papers() -> None:
    images, labels = tiny_set()
    rounds = dict(max_rounds=1, exit_loss=0.0)
    fast = fitted(images, labels, fast=True, fast_steps=2, fast_step_size="4/255", **rounds)
    paper = fitted(images, labels, fast=False, steps=7, **rounds)
    assert fast.image_steps == 2 * len(images) and paper.image_steps == 7 * len(images)
    assert fast.noise.abs().max() <= EPS + 1e-7 and paper.noise.abs().max() <= EPS + 1e-7


class Fixed(nn.Module):
    """A linear scorer: image i's logits are its mean colour times a fixed matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[8.0, -8.0], [-8.0, 8.0], [0.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) @ self.weight


def test_an_image_below_the_exit_loss_keeps_its_noise() -> None:
    model = Fixed()
    # image 0: red, label 0 -> loss ~ e^-8, below the threshold from the start;
    # image 1: red, label 1 -> high loss, moves every step.
    images = torch.zeros(2, 3, 4, 4)
    images[:, 0] = 1.0
    labels = torch.tensor([0, 1])
    start = (torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1) * EPS
    delta, correct, image_steps = min_min_pgd(surrogate_loss(model, NO_AUTOCAST), images, labels, start, steps=5, step_size=EPS / 4, eps=EPS, exit_loss=0.1)
    assert torch.equal(delta[0], start[0]), "the skipped image's noise must be kept as it was"
    assert not torch.equal(delta[1], start[1])
    assert delta.abs().max() <= EPS + 1e-7
    # correctness of each final noisy image, as a separate forward pass scores it
    assert torch.equal(correct, model((images + delta).clamp(0, 1)).argmax(1) == labels)


def test_exits_follow_the_loss_threshold() -> None:
    """With a threshold above every image's loss nothing moves; with 0 every image takes every step."""
    images, labels = tiny_set(n_per_class=4)
    x = images.float().div(255)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    start = torch.zeros_like(x)
    kept, _, steps_kept = min_min_pgd(surrogate_loss(model, NO_AUTOCAST), x, labels, start, steps=3, step_size=EPS / 3, eps=EPS, exit_loss=1e9)
    assert torch.equal(kept, start) and steps_kept == len(x)
    moved, correct, steps_all = min_min_pgd(surrogate_loss(model, NO_AUTOCAST), x, labels, start, steps=3, step_size=EPS / 3, eps=EPS, exit_loss=0.0)
    assert steps_all == 3 * len(x) and (moved - start).abs().amax(dim=(1, 2, 3)).min() > 0
    paper, none, steps_paper = min_min_pgd(surrogate_loss(model, NO_AUTOCAST), x, labels, start, steps=3, step_size=EPS / 3, eps=EPS)
    assert none is None and steps_paper == steps_all and torch.allclose(paper, moved, atol=1e-6)

"""Error-minimising noise: Huang et al., "Unlearnable Examples: Making Personal Data
Unexploitable", ICLR 2021 (arXiv:2101.04898).

Bi-level min-min optimisation: alternately (a) train a surrogate classifier for a few steps on
the noisy data and (b) run PGD that *minimises* its loss with respect to the noise, under an
L-inf budget (eps 8/255). The data become "too easy": the shortcut carried by the noise is
learned instead of the image content. Stops once the surrogate's error on the noisy training
data falls to ``stop_error``.

- ``em-samplewise``: one noise per image (20 PGD steps of 0.8/255 per noise pass).
- ``em-classwise``: one noise per class; each batch takes one PGD step from the class noise and
  the class noise becomes the mean of its batch members' perturbations.
Defaults follow the official code (HanxunH/Unlearnable-Examples); see ``configs/em-*.yaml``.
The working resolution, batch size and step size adapt to the folder unless set (the rules
below, :mod:`protect.autoset`); they give the paper's values at the paper's sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from protect.autoset import AutoSetting, FolderFacts, clamp
from protect.budget import project_linf, signed_gradient_step
from protect.generator import Batch, FitScope, StoredNoiseGenerator, register
from protect.progress import NullReporter, Reporter
from protect.surrogates import SurrogateMethodConfig, build_surrogate, sgd_step


@dataclass
class ErrorMinimisingConfig(SurrogateMethodConfig):
    """The official surrogate is ``resnet18``; ``small-cnn`` is the CPU default.
    steps / step_size: PGD steps per batch in each noise pass, and their L-inf step.
    train_steps: surrogate SGD steps between noise passes.
    stop_error: stop once the surrogate's error on the noisy data is at most this.
    max_rounds: give up (with a warning) after this many train+noise rounds.
    """

    steps: int = 20
    step_size: float = 0.8 / 255
    train_steps: int = 10
    stop_error: float = 0.01
    max_rounds: int = 50

    def validate(self) -> None:
        super().validate()
        if self.steps < 1 or self.train_steps < 0 or self.max_rounds < 1:
            raise ValueError("steps and max_rounds must be >= 1, train_steps >= 0")
        if not 0 <= self.stop_error < 1:
            raise ValueError(f"stop_error must be in [0, 1); got {self.stop_error}")


def min_min_pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    start: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    eps: float,
    autocast: torch.autocast,
) -> torch.Tensor:
    """PGD that descends the classification loss: the inner minimisation of min-min.

    images: float (N,3,H,W) in [0,1]; start: initial perturbation. Returns a perturbation in
    the eps ball (not clipped to the pixel range, so class-wise averages stay unbiased)."""
    delta = start
    for _ in range(steps):
        noisy = (images + delta).clamp(0, 1).requires_grad_(True)
        with autocast:
            loss = F.cross_entropy(model(noisy), labels)
        (grad,) = torch.autograd.grad(loss, noisy)
        stepped = signed_gradient_step(noisy.detach(), grad, step_size, descend=True)
        delta = project_linf(stepped - images, eps)
    return delta.detach()


# Settings chosen from the folder ------------------------------------------------------------
# The paper's values (batch 512, step 0.8/255, 32 px) are what these rules give at the sizes
# the paper used (CIFAR-10: 50,000 images of 32 px); configs/em-*.yaml say so beside each key.

#: images with a shorter side of at least this many pixels are photos
PHOTO_SIDE = 64
#: the working resolution of photos (measured: docs/photos.md)
PHOTO_RESOLUTION = 64
PAPER_BATCH, PAPER_STEP = 512, 0.8 / 255


def _resolution(facts: FolderFacts, config: dict[str, Any]) -> int | None:
    if facts.side is None:
        return None
    return PHOTO_RESOLUTION if facts.side >= PHOTO_SIDE else 32


def _class_noise_batch(facts: FolderFacts, config: dict[str, Any]) -> int:
    # Class noise moves one step per batch: at least ~10 batches per noise pass, or the surrogate
    # memorises a small set (reaching stop_error) before the noise has become a shortcut.
    return int(clamp(facts.images // 10, 8, PAPER_BATCH))


def _class_noise_step(facts: FolderFacts, config: dict[str, Any]) -> float:
    # Fewer images, fewer batches per pass: larger steps (up to eps/4) so that the noise still
    # crosses the budget in a few passes; 0.8/255 with the paper's batches.
    return clamp(PAPER_STEP * (PAPER_BATCH / config["batch_size"]) ** 0.5, PAPER_STEP, config["eps"] / 4)


RESOLUTION_RULE = AutoSetting(
    "resolution", f"{PHOTO_RESOLUTION} px for photos (median shorter side {PHOTO_SIDE} px or more), else 32 px (CIFAR-sized)",
    _resolution, from_size=True,
)
CLASS_NOISE_RULES = (
    RESOLUTION_RULE,
    AutoSetting("batch_size", "images / 10, between 8 and 512 (the paper's 512 from 5,120 images on)", _class_noise_batch),
    AutoSetting(
        "step_size", "0.8/255 x sqrt(512 / batch_size), between 0.8/255 (the paper's, at batch 512) and eps/4",
        _class_noise_step, levels=True,
    ),
)


class _MinMin(StoredNoiseGenerator):
    """The shared min-min loop; subclasses say how noise is stored and updated."""

    config_class = ErrorMinimisingConfig
    needs_labels = True
    data_parallel_fit = True
    shuffle_noise_pass: bool = True

    def __init__(self, config: ErrorMinimisingConfig, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__(config, device=device, seed=seed)
        self.rounds_run = 0
        self.final_error: float | None = None
        self.converged = False
        self._pending_batches: list[torch.Tensor] = []

    # storage --------------------------------------------------------------------------
    def _init_noise(self, n_images: int, n_classes: int, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _noise_for(self, indices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _store(self, indices: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor) -> None:
        raise NotImplementedError

    # the loop -------------------------------------------------------------------------
    def fit(self, images: torch.Tensor, labels: torch.Tensor | None, reporter: Reporter | None = None) -> None:
        if labels is None:
            raise ValueError(f"{self.name} needs labels (or pseudo-labels) to fit")
        reporter = reporter or NullReporter()
        cfg: ErrorMinimisingConfig = self.config
        gen = torch.Generator().manual_seed(self.seed)
        n_classes = int(labels.max()) + 1
        x_all = images.float().div(255)
        y_all = labels.long()
        self.noise = self._init_noise(len(images), n_classes, tuple(images.shape[1:]), gen)
        model = build_surrogate(cfg.surrogate, n_classes, device=self.device, seed=self.seed)
        optimizer = cfg.sgd(model)
        train_order = self._batches(len(images), gen, shuffle=True)
        self._pending_batches = []
        for round_index in range(1, cfg.max_rounds + 1):
            self._train_surrogate(model, optimizer, x_all, y_all, train_order)
            n_batches = -(-len(images) // cfg.batch_size)
            with reporter.phase(f"{self.name}: round {round_index} noise pass", total=n_batches) as phase:
                for idx in next(self._batches(len(images), gen, shuffle=self.shuffle_noise_pass)):
                    self._noise_pass_batch(model, x_all, y_all, idx)
                    phase.advance()
                error = self._error_on_noisy_data(model, x_all, y_all)
                phase.describe(f"{self.name}: round {round_index}: surrogate error on noisy data {error:.4f}")
            self.rounds_run, self.final_error = round_index, error
            if error <= cfg.stop_error:
                self.converged = True
                return
        reporter.message(
            f"{self.name}: stopped after max_rounds={cfg.max_rounds} with surrogate error {self.final_error:.4f} "
            f"(target {cfg.stop_error}); raise max_rounds for a stronger shortcut",
            level="warning",
        )

    def _batches(self, n: int, gen: torch.Generator, *, shuffle: bool):
        """An endless iterator of epochs, each a list of index batches."""
        while True:
            order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            yield list(order.split(self.config.batch_size))

    def _train_surrogate(self, model, optimizer, x_all, y_all, train_order) -> None:
        """``train_steps`` SGD steps on the noisy data, continuing through shuffled epochs."""
        cfg: ErrorMinimisingConfig = self.config
        model.train().requires_grad_(True)
        for _ in range(cfg.train_steps):
            if not self._pending_batches:
                self._pending_batches = next(train_order)
            idx = self._pending_batches.pop(0)
            mine = self.ranks.share(idx)
            sgd_step(model, optimizer, *self._noisy(x_all, y_all, mine), self.autocast(), ranks=self.ranks, share=len(mine) / len(idx))

    def _noisy(self, x_all: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x_all[idx].to(self.device)
        y = y_all[idx].to(self.device)
        delta = self._noise_for(idx, y_all[idx]).to(self.device)
        noisy = (x + delta).clamp(0, 1).contiguous(memory_format=torch.channels_last)
        return noisy, y

    def _noise_pass_batch(self, model, x_all, y_all, idx) -> None:
        """PGD on this process's share of the batch; the shares are gathered so that every
        process stores the noise of the whole batch."""
        cfg: ErrorMinimisingConfig = self.config
        model.eval().requires_grad_(False)
        mine = self.ranks.share(idx)
        x = x_all[mine].to(self.device).contiguous(memory_format=torch.channels_last)
        y = y_all[mine].to(self.device)
        start = self._noise_for(mine, y_all[mine]).to(self.device)
        delta = start
        if len(mine):
            delta = min_min_pgd(
                model, x, y, start, steps=cfg.steps, step_size=cfg.step_size, eps=cfg.eps, autocast=self.autocast()
            )
        delta = self.ranks.gather(delta.float(), len(idx))
        self._store(idx, y_all[idx], delta.cpu())

    @torch.no_grad()
    def _error_on_noisy_data(self, model, x_all, y_all) -> float:
        model.eval()
        wrong = 0
        for idx in torch.arange(len(x_all)).split(self.config.batch_size):
            mine = self.ranks.share(idx)
            if len(mine):
                x, y = self._noisy(x_all, y_all, mine)
                with self.autocast():
                    wrong += int((model(x).argmax(1) != y).sum())
        return self.ranks.total(wrong) / len(x_all)

    def fit_summary(self) -> dict[str, Any]:
        return {"rounds_run": self.rounds_run, "final_error": self.final_error, "converged": self.converged}

    def perturb(self, batch: Batch) -> torch.Tensor:
        self._stored_noise()
        if batch.labels is None:
            raise ValueError(f"{self.name}: perturb() needs the labels the noise was fitted with")
        return self._noise_for(batch.indices.cpu(), batch.labels.cpu()).to(batch.images.device)


@register("em-samplewise")
class SampleWiseErrorMinimising(_MinMin):
    summary = "Error-minimising noise, one per image (Huang et al., ICLR 2021)."
    shuffle_noise_pass = False
    auto_settings = (RESOLUTION_RULE,)

    def _init_noise(self, n_images, n_classes, shape, gen):
        return (torch.rand((n_images, *shape), generator=gen) * 2 - 1) * self.config.eps

    def _noise_for(self, indices, labels):
        return self.noise[indices]

    def _store(self, indices, labels, delta):
        self.noise[indices] = delta


@register("em-classwise")
class ClassWiseErrorMinimising(_MinMin):
    summary = "Error-minimising noise, one per class (Huang et al., ICLR 2021)."
    fit_scope = FitScope.CLASSES
    auto_settings = CLASS_NOISE_RULES

    def _init_noise(self, n_images, n_classes, shape, gen):
        return (torch.rand((n_classes, *shape), generator=gen) * 2 - 1) * self.config.eps

    def _noise_for(self, indices, labels):
        return self.noise[labels]

    def _store(self, indices, labels, delta):
        for cls in labels.unique():
            members = labels == cls
            self.noise[cls] = project_linf(delta[members].mean(dim=0), self.config.eps)

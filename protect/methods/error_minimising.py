"""Error-minimising noise: Huang et al., "Unlearnable Examples: Making Personal Data
Unexploitable", ICLR 2021 (arXiv:2101.04898).

Bi-level min-min optimisation: alternately (a) train a surrogate classifier for a few steps on
the noisy data and (b) run PGD that *minimises* its loss with respect to the noise, under an
L-inf budget (eps 8/255). The data become "too easy": the shortcut carried by the noise is
learned instead of the image content. Stops once the surrogate's error on the noisy training
data falls to ``stop_error``.

- ``em-samplewise``: one noise per image (20 PGD steps of 0.8/255 per noise pass). Its fast
  path (``fast: true``, the default) makes noise that protects as well for a fraction of the
  work (measured in docs/methods/em-samplewise.md): ``fast_steps`` large steps per noise pass
  (one of 8/255), an image leaves PGD once the surrogate's loss on it is below ``exit_loss``
  (its noise is kept as it is), and the stop criterion is scored from the last PGD forward pass
  instead of a separate error pass. ``fast: false`` runs the paper's loop unchanged.
- ``em-classwise``: one noise per class; each batch takes one PGD step from the class noise and
  the class noise becomes the mean of its batch members' perturbations.
Defaults follow the official code (HanxunH/Unlearnable-Examples); see ``configs/em-*.yaml``.
The working resolution, batch size and step size adapt to the folder unless set (the rules
below, :mod:`protect.autoset`); they give the paper's values at the paper's sizes.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

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


@dataclass
class EarlyExitConfig(ErrorMinimisingConfig):
    """fast: early exit below ``exit_loss`` and the stop criterion scored during PGD; false
    runs the paper's loop unchanged.
    exit_loss: an image leaves PGD once the surrogate's cross-entropy on it is below this.
    """

    fast: bool = True
    exit_loss: float = 0.01

    def validate(self) -> None:
        super().validate()
        if self.exit_loss < 0:
            raise ValueError(f"exit_loss must be >= 0; got {self.exit_loss}")


@dataclass
class SampleWiseConfig(EarlyExitConfig):
    """fast_steps / fast_step_size: the PGD schedule of the fast path (``steps`` and
    ``step_size`` are the paper's, used with ``fast: false``)."""

    fast_steps: int = 1
    fast_step_size: float = 8 / 255

    def validate(self) -> None:
        super().validate()
        if self.fast_steps < 1 or self.fast_step_size <= 0:
            raise ValueError("fast_steps must be >= 1 and fast_step_size > 0")


#: (noisy images float (N,3,H,W) in [0,1], labels (N,)) -> (each image's loss (N,), whether the
#: surrogate classifies it correctly (N,) bool): what the noise minimises
ImageLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def surrogate_loss(model: nn.Module, autocast: torch.autocast) -> ImageLoss:
    """The plain min-min objective: the surrogate's cross-entropy on the noisy images."""

    def loss_of(noisy: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast:
            logits = model(noisy.contiguous(memory_format=torch.channels_last))
        return F.cross_entropy(logits.float(), labels, reduction="none"), logits.argmax(1) == labels

    return loss_of


def min_min_pgd(
    loss_of: ImageLoss,
    images: torch.Tensor,
    labels: torch.Tensor,
    start: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    eps: float,
    exit_loss: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """PGD that descends the classification loss: the inner minimisation of min-min.

    images: float (N,3,H,W) in [0,1]; start: initial perturbation; ``loss_of`` scores noisy
    images (:func:`surrogate_loss`, or a robust variant). Returns the perturbation in the eps ball (not
    clipped to the pixel range, so class-wise averages stay unbiased), and the number of
    image-steps taken.

    With ``exit_loss`` None every image takes ``steps`` steps on the batch's mean loss (the
    paper). Otherwise an image whose loss is below ``exit_loss`` stops where it is (its noise is
    kept), and one more forward pass scores the images that took every step, so the second
    value says whether the surrogate classifies each final noisy image correctly; it is None on
    the paper path."""
    if exit_loss is None:
        delta = start
        for _ in range(steps):
            noisy = (images + delta).clamp(0, 1).requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_of(noisy, labels)[0].mean(), noisy)
            delta = project_linf(signed_gradient_step(noisy.detach(), grad, step_size, descend=True) - images, eps)
        return delta.detach(), None, steps * len(images)

    delta = start.clone()
    correct = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    done = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    rows = torch.arange(len(images), device=images.device)  # the images the surrogate runs on
    image_steps = 0
    for step in range(steps + 1):
        x, y = images[rows], labels[rows]
        last = step == steps
        noisy = (x + delta[rows]).clamp(0, 1).requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            per_image, hit = loss_of(noisy, y)
        live = ~done[rows]
        correct[rows[live]] = hit[live]
        if last:
            break
        moving = live & (per_image.detach() >= exit_loss)
        # Summed, not averaged: an image's step does not depend on how many others are still moving.
        (grad,) = torch.autograd.grad(per_image.sum(), noisy)
        stepped = signed_gradient_step(noisy.detach(), grad, step_size, descend=True)
        delta[rows[moving]] = project_linf(stepped[moving] - x[moving], eps)
        done[rows[live & ~moving]] = True
        image_steps += len(rows)
        rows = _shrunk_rows(rows, done)
        if not len(rows):
            break
    return delta, correct, image_steps


def _shrunk_rows(rows: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """The rows to run the next PGD step on: halved (moving images first, then finished ones as
    padding) while at most half of them still move. Batch sizes stay few (n, n/2, n/4, ...),
    because each new size costs the CPU backend a fresh kernel plan."""
    moving = rows[~done[rows]]
    size = len(rows)
    while size > 8 and len(moving) <= size // 2:
        size //= 2
    if not len(moving):
        return moving
    if size == len(rows):
        return rows
    padding = rows[done[rows]][: size - len(moving)]
    return torch.cat([moving, padding])


# Settings chosen from the folder ------------------------------------------------------------
# The paper's values (batch 512, step 0.8/255, 32 px) are what these rules give at the sizes
# the paper used (CIFAR-10: 50,000 images of 32 px); configs/em-*.yaml name the rules beside each key.

#: images with a shorter side of at least this many pixels are photos
PHOTO_SIDE = 64
#: the working resolution of photos (`benchmarks/p2_auto.py` compares resolutions on Imagenette)
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


def class_noise_rules(base_step: float, whose: str) -> tuple[AutoSetting, ...]:
    """The rules of class noise whose step at batch 512 is ``base_step`` (``whose``: where that
    value comes from): the working resolution, a batch of about a tenth of the images, and a
    step that grows as the batches shrink."""

    def step(facts: FolderFacts, config: dict[str, Any]) -> float:
        # Fewer images, fewer batches per pass: larger steps (up to eps/4) so that the noise still
        # crosses the budget in a few passes; ``base_step`` with batches of 512.
        return clamp(base_step * (PAPER_BATCH / config["batch_size"]) ** 0.5, base_step, config["eps"] / 4)

    base = f"{base_step * 255:.3g}/255"
    return (
        RESOLUTION_RULE,
        AutoSetting("batch_size", "images / 10, between 8 and 512 (the paper's 512 from 5,120 images on)", _class_noise_batch),
        AutoSetting(
            "step_size", f"{base} x sqrt(512 / batch_size), between {base} ({whose}, at batch 512) and eps/4",
            step, levels=True,
        ),
    )


RESOLUTION_RULE = AutoSetting(
    "resolution", f"{PHOTO_RESOLUTION} px for photos (median shorter side {PHOTO_SIDE} px or more), else 32 px (CIFAR-sized)",
    _resolution, from_size=True,
)
CLASS_NOISE_RULES = class_noise_rules(PAPER_STEP, "the paper's")


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
        #: seconds of the last fit spent training the surrogate, in noise passes and in error passes
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self.image_steps = 0

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
        self.phase_seconds, self.image_steps = defaultdict(float), 0
        for round_index in range(1, cfg.max_rounds + 1):
            with self._timed("surrogate"):
                self._train_surrogate(model, optimizer, x_all, y_all, train_order)
            n_batches = -(-len(images) // cfg.batch_size)
            with reporter.phase(f"{self.name}: round {round_index} noise pass", total=n_batches) as phase:
                wrong: int | None = 0
                with self._timed("noise"):
                    for idx in next(self._batches(len(images), gen, shuffle=self.shuffle_noise_pass)):
                        batch_wrong = self._noise_pass_batch(model, x_all, y_all, idx)
                        wrong = None if batch_wrong is None or wrong is None else wrong + batch_wrong
                        phase.advance()
                if wrong is None:
                    with self._timed("error"):
                        error = self._error_on_noisy_data(model, x_all, y_all)
                else:
                    error = self.ranks.total(wrong) / len(images)
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

    @contextmanager
    def _timed(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] += time.perf_counter() - started

    def _exit_loss(self) -> float | None:
        """The early-exit threshold of PGD; None runs the paper's loop (every step on every
        image, then a separate error pass). Only where each image's noise is its own may the
        error be scored during PGD, as later batches do not change it."""
        return None

    def _pgd_schedule(self) -> tuple[int, float]:
        """(steps, step size) of PGD in each noise pass."""
        return self.config.steps, self.config.step_size

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
            noisy, y = self._noisy(x_all, y_all, mine)
            sgd_step(model, optimizer, self._surrogate_batch(model, noisy, y), y, self.autocast(),
                     ranks=self.ranks, share=len(mine) / len(idx))

    def _surrogate_batch(self, model: nn.Module, noisy: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What the surrogate trains on, given a batch of noisy images (robust variants transform
        and attack them)."""
        return noisy

    def _noisy(self, x_all: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x_all[idx].to(self.device)
        y = y_all[idx].to(self.device)
        delta = self._noise_for(idx, y_all[idx]).to(self.device)
        noisy = (x + delta).clamp(0, 1).contiguous(memory_format=torch.channels_last)
        return noisy, y

    def _noise_loss(self, model: nn.Module) -> ImageLoss:
        """What the noise pass minimises (robust variants wrap the surrogate in more)."""
        return surrogate_loss(model, self.autocast())

    def _noise_pass_batch(self, model, x_all, y_all, idx) -> int | None:
        """PGD on this process's share of the batch; the shares are gathered so that every
        process stores the noise of the whole batch. Returns how many of this process's images
        the surrogate misclassifies with their new noise, when PGD scored them (fast path)."""
        cfg: ErrorMinimisingConfig = self.config
        model.eval().requires_grad_(False)
        mine = self.ranks.share(idx)
        x = x_all[mine].to(self.device)
        y = y_all[mine].to(self.device)
        start = self._noise_for(mine, y_all[mine]).to(self.device)
        delta, correct, wrong = start, None, 0
        if len(mine):
            steps, step_size = self._pgd_schedule()
            delta, correct, steps_taken = min_min_pgd(
                self._noise_loss(model), x, y, start,
                steps=steps, step_size=step_size, eps=cfg.eps, exit_loss=self._exit_loss(),
            )
            self.image_steps += steps_taken
            wrong = None if correct is None else int((~correct).sum())
        elif self._exit_loss() is None:
            wrong = None
        delta = self.ranks.gather(delta.float(), len(idx))
        self._store(idx, y_all[idx], delta.cpu())
        return wrong

    def _error_on_noisy_data(self, model, x_all, y_all) -> float:
        """The stop criterion: the share of noisy images that the noise pass's objective
        (:meth:`_noise_loss`) finds misclassified."""
        model.eval()
        loss_of = self._noise_loss(model)
        wrong = 0
        for idx in torch.arange(len(x_all)).split(self.config.batch_size):
            mine = self.ranks.share(idx)
            if len(mine):
                noisy, y = self._noisy(x_all, y_all, mine)
                with torch.no_grad():
                    wrong += int((~loss_of(noisy, y)[1]).sum())
        return self.ranks.total(wrong) / len(x_all)

    def fit_summary(self) -> dict[str, Any]:
        # No timings here (they go into protection.json, which a rerun must reproduce byte for
        # byte); ``phase_seconds`` keeps them for benchmarks.
        return {"rounds_run": self.rounds_run, "final_error": self.final_error, "converged": self.converged,
                "pgd_image_steps": self.image_steps}

    def perturb(self, batch: Batch) -> torch.Tensor:
        self._stored_noise()
        if batch.labels is None:
            raise ValueError(f"{self.name}: perturb() needs the labels the noise was fitted with")
        return self._noise_for(batch.indices.cpu(), batch.labels.cpu()).to(batch.images.device)


@register("em-samplewise")
class SampleWiseErrorMinimising(_MinMin):
    summary = "Error-minimising noise, one per image (Huang et al., ICLR 2021)."
    config_class = SampleWiseConfig
    shuffle_noise_pass = False
    auto_settings = (RESOLUTION_RULE,)

    def _exit_loss(self) -> float | None:
        return self.config.exit_loss if self.config.fast else None

    def _pgd_schedule(self) -> tuple[int, float]:
        cfg = self.config
        return (cfg.fast_steps, cfg.fast_step_size) if cfg.fast else (cfg.steps, cfg.step_size)

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

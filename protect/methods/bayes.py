"""Bayes-error maximisation: Zhang, Sun, Lim, Zhang, "Towards Provably Unlearnable Examples via
Bayes Error Optimisation", AAAI 2026 (arXiv:2511.08191).

The Bayes error is the error of the best possible classifier, so raising it limits every victim,
including one that also sees clean data. It is estimated on a surrogate's penultimate features
f_i, all divided by one global scalar max_{i,d} |f_id|, with leave-one-out Gaussian-kernel local
averaging of the class posteriors,

    k_ij = exp(-||f_i - f_j||^2 / (2 sigma^2)),   p(c | i) = sum_{j != i} k_ij 1[y_j = c] / sum_{j != i} k_ij,
    BE = mean_i (1 - max_c p(c | i)),

and maximised over an L-inf-bounded perturbation (eps 8/255) of every image. Each outer step, as
in the authors' loop (cat-claws/unlearnable, ``cifar10-retrain.py``):

1. a fresh surrogate, seeded from the job seed and the step, is trained from scratch for
   ``surrogate_epochs`` on the current protected images (SGD, cosine schedule, no augmentation);
2. the features of the whole set are computed, and the gradient of the estimate with respect
   to every feature, including each image's effect on every other image's posterior;
3. one backward pass through the surrogate carries that gradient to the pixels;
4. one Adam step (maximising, lr ``noise_lr``) moves the perturbation, which is then projected
   onto the eps ball and the [0, 1] pixel range. The step follows the gradient of the sum of
   the images' errors (N times the estimate's), as the authors' estimator returns it.

Because the surrogate is new every step, the noise must raise the Bayes error of features that
a model trained on the protected data learns, not of one model's features.

Cost per outer step: ``surrogate_epochs`` epochs of training on N images, two forward passes
and one backward pass over N images, and the estimator: O(N^2 * D) multiply-adds for D feature
dimensions, computed ``chunk_size`` rows at a time, so the estimator's memory is
O(chunk_size * N + N * D). The noise and Adam's two moments take 3 x N x 3 x R x R floats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from protect.budget import project_to_valid
from protect.config import config_to_dict
from protect.generator import StoredNoiseGenerator, register
from protect.progress import NullReporter, Reporter
from protect.surrogates import SurrogateMethodConfig, build_surrogate, train_epochs
from protect.training_state import load_training_state, save_training_state, tensor_fingerprint

CHECKPOINT_STEM = "bayes-fit"  # bayes-fit.safetensors + bayes-fit.json in the runner's checkpoint folder


@dataclass
class BayesErrorConfig(SurrogateMethodConfig):
    """steps: outer steps (each trains a fresh surrogate and takes one Adam step on the pixels).
    surrogate_epochs: epochs each fresh surrogate trains on the current protected images.
    noise_lr: Adam's learning rate on the pixels (maximising the estimate).
    sigma: Gaussian kernel width on the max-abs-scaled features.
    chunk_size: estimator rows computed at once (bounds memory; does not change results).
    batch_size (shared): surrogate training batch, and the batch of the feature passes.
    """

    steps: int = 40
    surrogate_epochs: int = 10
    noise_lr: float = 1e-3
    sigma: float = 0.3
    chunk_size: int = 256

    def validate(self) -> None:
        super().validate()
        if self.steps < 1 or self.surrogate_epochs < 1:
            raise ValueError(f"steps and surrogate_epochs must be >= 1; got {self.steps}, {self.surrogate_epochs}")
        if self.noise_lr <= 0 or self.sigma <= 0:
            raise ValueError(f"noise_lr and sigma must be positive; got {self.noise_lr}, {self.sigma}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {self.chunk_size}")


# The estimator ----------------------------------------------------------------------------


def scale_by_max_abs(features: torch.Tensor) -> torch.Tensor:
    """Divide all features by one scalar, their largest absolute value, so that a kernel width
    means the same for every surrogate (the authors' normalisation)."""
    return features / features.abs().max().clamp_min(1e-12)


def bayes_error_gradient(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    sigma: float,
    *,
    chunk_size: int = 256,
    with_gradient: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The leave-one-out Gaussian-kernel Bayes-error estimate of a whole set, and its exact
    gradient with respect to every feature.

    features: float (N, D); labels: int64 (N,). Returns the estimate (a 0-d tensor in
    [0, 1 - 1/C]) and d estimate / d features (N, D), or None without ``with_gradient``. The
    gradient holds both ways an image moves the estimate: through its own posterior and through
    the posteriors of all other images it is a neighbour of. Rows are computed ``chunk_size`` at
    a time, so memory is O(chunk_size * N), never N x N; compute is O(N^2 * D).

    With w_ij = k_ij / sum_l k_il, p_i the posterior of image i's winning class c_i and
    h_ij = w_ij (1[y_j = c_i] - p_i), the derivative of (1 - p_i) is
    (1 / sigma^2) h_ij (x_i - x_j) with respect to x_i and its negative with respect to x_j
    (the winning class is held fixed, as the max is piecewise linear).
    """
    n = len(features)
    if n < 2:
        raise ValueError("the Bayes-error estimate needs at least two images")
    x = features
    y = labels.to(x.device)
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    norms = x.square().sum(1)
    total = x.new_zeros(())
    grad = torch.zeros_like(x) if with_gradient else None
    for start in range(0, n, chunk_size):
        rows = x[start : start + chunk_size]
        b = len(rows)
        own = torch.arange(b, device=x.device)
        logits = (norms[start : start + b, None] + norms[None, :] - 2 * rows @ x.T).clamp_min_(0)
        logits.mul_(-1 / (2 * sigma**2))
        logits[own, start + own] = -torch.inf  # leave one out
        # Each row's weights are a ratio, unchanged by a common factor: shifting by the row's
        # largest logit keeps the nearest neighbour at weight 1, so nothing underflows to 0/0.
        weights = logits.sub_(logits.amax(1, keepdim=True)).exp_()
        weights.div_(weights.sum(1, keepdim=True))
        posterior = weights @ onehot
        top, winner = posterior.max(1)
        total = total + (1 - top).sum()
        if grad is not None:
            h = weights.mul_((y[None, :] == winner[:, None]).to(x.dtype).sub_(top[:, None]))
            # rows of h sum to zero, so the x_i * sum_j h_ij term of d/dx_i vanishes
            grad[start : start + b] -= h @ x
            grad -= h.T @ rows
            grad += x * h.sum(0)[:, None]
    if grad is not None:
        grad.mul_(1 / (n * sigma**2))
    return total / n, grad


def scaled_bayes_error_gradient(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, sigma: float, *, chunk_size: int = 256
) -> tuple[float, torch.Tensor]:
    """The estimate on max-abs-scaled features and its gradient with respect to the unscaled
    features (including the path through the scale itself)."""
    raw = features.detach().float().requires_grad_(True)
    scaled = scale_by_max_abs(raw)
    estimate, grad_scaled = bayes_error_gradient(scaled.detach(), labels, num_classes, sigma, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(scaled, raw, grad_scaled)
    return float(estimate), grad


def estimate_bayes_error(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, sigma: float, *, chunk_size: int = 256
) -> float:
    """The estimate on max-abs-scaled features, without a gradient."""
    scaled = scale_by_max_abs(features.detach().float())
    estimate, _ = bayes_error_gradient(scaled, labels, num_classes, sigma, chunk_size=chunk_size, with_gradient=False)
    return float(estimate)


def step_seed(seed: int, step: int) -> int:
    """The seed of outer step ``step``'s surrogate (its initialisation and its data order)."""
    return seed * 1_000_003 + step


# The method -------------------------------------------------------------------------------


class _Perturbation(nn.Module):
    """The perturbation of every image: the one parameter Adam moves, and what a checkpoint keeps."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(shape))


@register("bayes")
class BayesErrorMaximising(StoredNoiseGenerator):
    summary = "Bayes-error maximisation against a fresh surrogate every step, one noise per image (Zhang et al., AAAI 2026)."
    config_class = BayesErrorConfig
    needs_labels = True

    def __init__(self, config: BayesErrorConfig, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__(config, device=device, seed=seed)
        self.history: list[dict[str, Any]] = []

    def fit(self, images: torch.Tensor, labels: torch.Tensor | None, reporter: Reporter | None = None) -> None:
        """images: uint8 (N, 3, R, R); labels: int64 (N,). Continues from ``fit_checkpoint_dir``
        when it holds the progress of the same fit (data, config, seed), and saves there after
        every outer step."""
        if labels is None:
            raise ValueError("bayes needs labels (or pseudo-labels) to fit")
        reporter = reporter or NullReporter()
        cfg: BayesErrorConfig = self.config
        x = images.float().div(255)
        y = labels.long()
        n_classes = int(y.max()) + 1
        perturbation = _Perturbation(tuple(x.shape))
        optimizer = torch.optim.Adam(perturbation.parameters(), lr=cfg.noise_lr, maximize=True)
        stem = Path(self.fit_checkpoint_dir) / CHECKPOINT_STEM if self.fit_checkpoint_dir is not None else None
        identity = {"method": self.name, "config": config_to_dict(cfg), "seed": self.seed,
                    "data": tensor_fingerprint(images, labels)}
        self.history = []
        if stem is not None:
            saved = load_training_state(stem, perturbation, optimizer, None, None, identity)
            if saved is not None:
                self.history = saved["history"]
                reporter.message(f"bayes: resuming after outer step {saved['step']} of {cfg.steps} (saved in {stem.parent})")
        for step in range(len(self.history), cfg.steps):
            self.history.append(self._outer_step(step, x, y, n_classes, perturbation.delta, optimizer, reporter))
            if stem is not None:
                stem.parent.mkdir(parents=True, exist_ok=True)
                record = {"identity": identity, "step": step + 1, "history": self.history}
                save_training_state(stem, perturbation, optimizer, None, None, record)
        self.noise = perturbation.delta.detach().clone()

    def _outer_step(
        self, step: int, x: torch.Tensor, y: torch.Tensor, n_classes: int, delta: nn.Parameter,
        optimizer: torch.optim.Optimizer, reporter: Reporter,
    ) -> dict[str, Any]:
        cfg: BayesErrorConfig = self.config
        started = time.perf_counter()
        title = f"bayes: step {step + 1}/{cfg.steps}"
        with reporter.phase(f"{title}: training a fresh surrogate", total=cfg.surrogate_epochs + 1) as phase:
            protected = x + delta.detach()
            model = self.fresh_surrogate(step, protected, y, n_classes, on_epoch=phase.advance)
            phase.describe(f"{title}: gradient of the estimated Bayes error")
            clean_accuracy = self._accuracy(model, x, y)
            before, feature_grad = scaled_bayes_error_gradient(
                self._features(model, protected), y, n_classes, cfg.sigma, chunk_size=cfg.chunk_size
            )
            # Adam ignores the gradient's scale except against its eps (1e-8): step on the gradient
            # of the sum over images, as the authors do, so that a large set's per-pixel gradients
            # (each ~1/N of the mean's) are not damped towards zero.
            delta.grad = self._pixel_gradient(model, protected, feature_grad * len(x))
            optimizer.step()
            with torch.no_grad():
                delta.copy_(project_to_valid(x, delta, cfg.eps))
            after = estimate_bayes_error(self._features(model, x + delta.detach()), y, n_classes, cfg.sigma,
                                         chunk_size=cfg.chunk_size)
            phase.advance()
            record = {
                "step": step + 1,
                "before": round(before, 5),
                "after": round(after, 5),
                "surrogate_clean_accuracy": round(clean_accuracy, 5),
                "mean_abs_noise_levels": round(float(delta.detach().abs().mean()) * 255, 3),
                "seconds": round(time.perf_counter() - started, 2),
            }
            phase.describe(
                f"{title}: estimated Bayes error {before:.4f} -> {after:.4f}; fresh surrogate's accuracy on the clean "
                f"images {100 * clean_accuracy:.1f}%; mean |noise| {record['mean_abs_noise_levels']:.2f}/255"
            )
        return record

    def fresh_surrogate(
        self, step: int, protected: torch.Tensor, y: torch.Tensor, n_classes: int,
        on_epoch: Callable[[], None] | None = None,
    ) -> nn.Module:
        """Outer step ``step``'s surrogate: initialised from :func:`step_seed` and trained from
        scratch on ``protected`` (float, [0, 1]) with SGD and a cosine schedule over
        ``surrogate_epochs``, without augmentation (as the authors' loop); returned in eval mode."""
        cfg: BayesErrorConfig = self.config
        seed = step_seed(self.seed, step)
        model = build_surrogate(cfg.surrogate, n_classes, device=self.device, seed=seed)
        optimizer = cfg.sgd(model)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.surrogate_epochs)

        def epoch_done() -> None:
            schedule.step()
            if on_epoch is not None:
                on_epoch()

        train_epochs(
            model, optimizer, lambda idx: (protected[idx].to(self.device), y[idx].to(self.device)), len(protected),
            epochs=cfg.surrogate_epochs, batch_size=cfg.batch_size, generator=torch.Generator().manual_seed(seed),
            autocast=self.autocast(), on_epoch=epoch_done,
        )
        return model.eval().requires_grad_(False)

    def _batches(self, n: int) -> list[torch.Tensor]:
        return list(torch.arange(n).split(self.config.batch_size))

    def _embed(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            features = model.embed(images.to(self.device).contiguous(memory_format=torch.channels_last))
        return features.float()

    @torch.no_grad()
    def _features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._embed(model, images[idx]) for idx in self._batches(len(images))])

    @torch.no_grad()
    def _accuracy(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
        correct = 0
        for idx in self._batches(len(images)):
            with self.autocast():
                logits = model(images[idx].to(self.device).contiguous(memory_format=torch.channels_last))
            correct += int((logits.argmax(1).cpu() == labels[idx]).sum())
        return correct / len(images)

    def _pixel_gradient(self, model: nn.Module, images: torch.Tensor, feature_grad: torch.Tensor) -> torch.Tensor:
        """d estimate / d pixels: the feature gradient carried back through the surrogate, a batch at a time."""
        grad = torch.empty_like(images)
        for idx in self._batches(len(images)):
            batch = images[idx].to(self.device).requires_grad_(True)
            self._embed(model, batch).backward(feature_grad[idx].to(self.device))
            grad[idx] = batch.grad.cpu()
        return grad

    def fit_summary(self) -> dict[str, Any]:
        return {"steps_run": len(self.history), "steps": self.history}

"""Bayes-error maximisation: Zhang, Sun, Lim, Zhang, "Towards Provably Unlearnable Examples via
Bayes Error Optimisation", AAAI 2026 (arXiv:2511.08191).

The Bayes error is the error of the best possible classifier, so raising it limits every
victim, including one that also sees clean data. It is estimated on a surrogate's feature
embeddings with leave-one-out RBF-kernel local averaging of the class posteriors,

    p(c | x_i) = sum_{j != i} k(x_i, x_j) 1[y_j = c] / sum_{j != i} k(x_i, x_j),
    BE = mean_i (1 - max_c p(c | x_i)),

and maximised by projected gradient ascent on the pixels under an L-inf budget (eps 8/255),
projecting onto the eps ball and [0, 1] after every step. The surrogate is trained on the clean
data first and re-trained on the current protected data every ``retrain_every`` rounds, so the
noise keeps working against a model that has seen it.

Cost: one round is ``steps`` forward/backward passes of the surrogate over all N images plus
the kernel sums of each batch against every image, O(steps * N^2 * D) multiply-adds in total,
computed ``chunk_size`` columns at a time, so memory is O(N) for the stored noise and features
plus O(batch_size * chunk_size) for the kernel (about 1.3 GiB of noise and pixels for 50,000
32 px images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from protect.budget import project_to_valid, signed_gradient_step
from protect.generator import StoredNoiseGenerator, register
from protect.progress import NullReporter, Reporter
from protect.surrogates import SurrogateMethodConfig, build_surrogate, train_epochs


@dataclass
class BayesErrorConfig(SurrogateMethodConfig):
    """rounds: passes of projected gradient ascent over the whole set.
    steps / step_size: ascent steps per batch in each round, and their L-inf step.
    bandwidth_scale: RBF width as a multiple of the median pairwise feature distance.
    chunk_size: kernel columns computed at once (bounds memory; does not change results).
    warmup_epochs: surrogate epochs on the clean data before the first round.
    retrain_every / retrain_epochs: re-train the surrogate on the protected data every this
        many rounds (0 = never), for this many epochs.
    """

    rounds: int = 5
    steps: int = 10
    step_size: float = 1 / 255
    bandwidth_scale: float = 0.15
    chunk_size: int = 4096
    warmup_epochs: int = 20
    retrain_every: int = 1
    retrain_epochs: int = 2

    def validate(self) -> None:
        super().validate()
        if self.rounds < 1 or self.steps < 1:
            raise ValueError("rounds and steps must be >= 1")
        if self.bandwidth_scale <= 0 or self.step_size <= 0:
            raise ValueError("bandwidth_scale and step_size must be positive")
        if self.chunk_size < 1 or self.warmup_epochs < 0 or self.retrain_every < 0 or self.retrain_epochs < 0:
            raise ValueError("chunk_size must be >= 1; warmup_epochs, retrain_every, retrain_epochs >= 0")


# The estimator ----------------------------------------------------------------------------


def _log_kernel(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """log k(a_i, b_j) = -||a_i - b_j||^2 / (2 h^2), shape (len(a), len(b))."""
    return -torch.cdist(a, b).square() / (2 * bandwidth**2)


def _chunk_class_sums(
    anchors: torch.Tensor, others: torch.Tensor, others_onehot: torch.Tensor, excluded: torch.Tensor,
    shift: torch.Tensor, bandwidth: float,
) -> torch.Tensor:
    weights = (_log_kernel(anchors, others, bandwidth) - shift[:, None]).exp()
    return weights.masked_fill(excluded[None, :], 0.0) @ others_onehot


def loo_class_posteriors(
    anchors: torch.Tensor,
    anchor_index: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    bandwidth: float,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Leave-one-out RBF-kernel class posteriors p(c | x_i) of ``anchors`` against a feature bank.

    anchors: float (B, D), differentiable; they are the bank rows ``anchor_index`` (B,), whose
    stored (detached) values are replaced by the live anchors, so the result is exactly the
    estimator over the whole set with gradients through the anchors. bank: float (N, D);
    bank_labels: int64 (N,). Returns (B, num_classes), rows summing to 1. The kernel is
    evaluated ``chunk_size`` bank rows at a time and recomputed on backward, so memory is
    O(B * chunk_size) rather than O(B * N).
    """
    n = bank.shape[0]
    if n < 2:
        raise ValueError("the Bayes-error estimate needs at least two images")
    anchors = anchors.float()
    bank = bank.detach().float()
    in_batch = torch.zeros(n, dtype=torch.bool, device=bank.device)
    in_batch[anchor_index] = True
    self_pairs = torch.eye(len(anchors), dtype=torch.bool, device=anchors.device)

    # Kernel values span many orders of magnitude; dividing every weight of an anchor by its
    # largest one (a constant for the ratio, so it needs no gradient) avoids underflow.
    with torch.no_grad():
        shift = _log_kernel(anchors, anchors, bandwidth).masked_fill(self_pairs, -torch.inf).amax(1)
        for start in range(0, n, chunk_size):
            block = _log_kernel(anchors, bank[start : start + chunk_size], bandwidth)
            block = block.masked_fill(in_batch[None, start : start + chunk_size], -torch.inf)
            shift = torch.maximum(shift, block.amax(1))

    onehot = F.one_hot(bank_labels, num_classes).float()
    live = (_log_kernel(anchors, anchors, bandwidth) - shift[:, None]).exp().masked_fill(self_pairs, 0.0)
    sums = live @ onehot[anchor_index]
    for start in range(0, n, chunk_size):
        stop = start + chunk_size
        sums = sums + checkpoint(
            _chunk_class_sums, anchors, bank[start:stop], onehot[start:stop], in_batch[start:stop], shift, bandwidth,
            use_reentrant=False,
        )
    return sums / sums.sum(1, keepdim=True)


def bayes_error(posteriors: torch.Tensor) -> torch.Tensor:
    """The plug-in Bayes-error estimate mean_i (1 - max_c p(c | x_i))."""
    return (1 - posteriors.max(dim=1).values).mean()


@torch.no_grad()
def estimate_bayes_error(
    bank: torch.Tensor, labels: torch.Tensor, num_classes: int, bandwidth: float, *,
    batch_size: int = 1024, chunk_size: int = 4096,
) -> float:
    """The estimate over a whole feature bank (N, D), computed ``batch_size`` anchors at a time."""
    total = 0.0
    for index in torch.arange(len(bank), device=bank.device).split(batch_size):
        posteriors = loo_class_posteriors(bank[index], index, bank, labels, num_classes, bandwidth, chunk_size)
        total += float(bayes_error(posteriors)) * len(index)
    return total / len(bank)


def median_distance(features: torch.Tensor, *, sample: int = 1000, seed: int = 0) -> float:
    """Median pairwise distance of (a seeded sample of) ``features``: the median heuristic."""
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(features), generator=gen)[:sample].to(features.device)
    x = features[pick].float()
    distances = torch.cdist(x, x)
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return float(distances[off_diagonal].median().clamp_min(1e-6))


def embed_normalised(model: nn.Module, images: torch.Tensor, autocast: torch.autocast) -> torch.Tensor:
    """Unit-length surrogate embeddings, so the kernel width is on a fixed scale."""
    with autocast:
        features = model.embed(images.contiguous(memory_format=torch.channels_last))
    return F.normalize(features.float(), dim=1)


def bayes_error_ascent(
    model: nn.Module,
    images: torch.Tensor,
    index: torch.Tensor,
    start: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    *,
    num_classes: int,
    steps: int,
    step_size: float,
    eps: float,
    bandwidth: float,
    chunk_size: int,
    autocast: torch.autocast,
) -> tuple[torch.Tensor, list[float]]:
    """Projected gradient ascent of the Bayes-error estimate for one batch.

    images: float (B,3,H,W) in [0,1], the bank rows ``index``; start: their current
    perturbation. Each step moves the pixels by ``step_size`` along the gradient sign, then
    projects onto the eps ball and [0, 1]. Returns the new perturbation and the estimate seen
    at each step (before its update)."""
    delta = start
    history = []
    for _ in range(steps):
        noisy = (images + delta).requires_grad_(True)
        features = embed_normalised(model, noisy, autocast)
        estimate = bayes_error(
            loo_class_posteriors(features, index, bank, bank_labels, num_classes, bandwidth, chunk_size)
        )
        (grad,) = torch.autograd.grad(estimate, noisy)
        history.append(float(estimate.detach()))
        stepped = signed_gradient_step(noisy.detach(), grad, step_size, descend=False)
        delta = project_to_valid(images, stepped - images, eps)
    return delta.detach(), history


# The method -------------------------------------------------------------------------------


@register("bayes")
class BayesErrorMaximising(StoredNoiseGenerator):
    summary = "Bayes-error maximisation by projected gradient ascent, one noise per image (Zhang et al., AAAI 2026)."
    config_class = BayesErrorConfig
    needs_labels = True

    def __init__(self, config: BayesErrorConfig, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__(config, device=device, seed=seed)
        self.estimates: list[dict[str, float]] = []

    def fit(self, images: torch.Tensor, labels: torch.Tensor | None, reporter: Reporter | None = None) -> None:
        if labels is None:
            raise ValueError("bayes needs labels (or pseudo-labels) to fit")
        reporter = reporter or NullReporter()
        cfg: BayesErrorConfig = self.config
        gen = torch.Generator().manual_seed(self.seed)
        x_all = images.float().div(255)
        y_all = labels.long().to(self.device)
        n_classes = int(labels.max()) + 1
        self.noise = torch.zeros_like(x_all)
        self.estimates = []
        model = build_surrogate(cfg.surrogate, n_classes, device=self.device, seed=self.seed)
        optimizer = cfg.sgd(model)
        self._train(model, optimizer, x_all, y_all, cfg.warmup_epochs, gen, reporter, "surrogate warm-up on clean data")
        for round_index in range(1, cfg.rounds + 1):
            if round_index > 1 and cfg.retrain_every and (round_index - 1) % cfg.retrain_every == 0:
                self._train(model, optimizer, x_all, y_all, cfg.retrain_epochs, gen, reporter,
                            f"bayes: round {round_index} surrogate re-training on protected data")
            self._ascent_round(model, x_all, y_all, n_classes, gen, reporter, round_index)

    def _train(self, model, optimizer, x_all, y_all, epochs, gen, reporter, title) -> None:
        if epochs == 0:
            return
        with reporter.phase(title, total=epochs) as phase:
            train_epochs(
                model, optimizer, lambda idx: ((x_all[idx] + self.noise[idx]).to(self.device), y_all[idx]),
                len(x_all), epochs=epochs, batch_size=self.config.batch_size, generator=gen,
                autocast=self.autocast(), on_epoch=phase.advance,
            )

    @torch.no_grad()
    def _feature_bank(self, model, x_all) -> torch.Tensor:
        model.eval()
        chunks = [
            embed_normalised(model, (x_all[idx] + self.noise[idx]).to(self.device), self.autocast())
            for idx in torch.arange(len(x_all)).split(self.config.batch_size)
        ]
        return torch.cat(chunks)

    def _ascent_round(self, model, x_all, y_all, n_classes, gen, reporter, round_index) -> None:
        cfg: BayesErrorConfig = self.config
        model.eval().requires_grad_(False)
        bank = self._feature_bank(model, x_all)
        bandwidth = cfg.bandwidth_scale * median_distance(bank, seed=self.seed)
        before = estimate_bayes_error(bank, y_all, n_classes, bandwidth, chunk_size=cfg.chunk_size)
        order = torch.randperm(len(x_all), generator=gen).split(cfg.batch_size)
        with reporter.phase(f"bayes: round {round_index} gradient ascent", total=len(order)) as phase:
            for idx in order:
                index = idx.to(self.device)
                images = x_all[idx].to(self.device)
                delta, _ = bayes_error_ascent(
                    model, images, index, self.noise[idx].to(self.device), bank, y_all,
                    num_classes=n_classes, steps=cfg.steps, step_size=cfg.step_size, eps=cfg.eps,
                    bandwidth=bandwidth, chunk_size=cfg.chunk_size, autocast=self.autocast(),
                )
                self.noise[idx] = delta.cpu()
                with torch.no_grad():
                    bank[index] = embed_normalised(model, images + delta, self.autocast())
                phase.advance()
            after = estimate_bayes_error(bank, y_all, n_classes, bandwidth, chunk_size=cfg.chunk_size)
            phase.describe(f"bayes: round {round_index}: estimated Bayes error {before:.4f} -> {after:.4f}")
        model.requires_grad_(True)
        self.estimates.append({"before": round(before, 5), "after": round(after, 5)})

    def fit_summary(self) -> dict:
        return {"rounds_run": len(self.estimates), "estimated_bayes_error": self.estimates}

"""Unlearnable Clusters: Zhang, Ma, Yi, Sang, Jiang, Wang, Xu, "Unlearnable Clusters: Towards
Label-agnostic Unlearnable Examples", CVPR 2023 (arXiv:2301.01217); defaults from the official
code (jiamingzhang94/Unlearnable-Clusters), see ``configs/clusters.yaml``.

No labels are used anywhere, so the protection does not depend on how whoever scrapes the
images labels them:

1. embed every image with a surrogate feature extractor (CLIP's image encoder by default; a
   self-supervised encoder trained here on unlabelled pictures, or a torchvision, timm or
   project model as options) and split the set into K clusters by k-means;
2. for each cluster k train a perturbation generator, a ResNet encoder/decoder with a tanh
   output fed a fixed uniform noise image, so it parametrises one (3, R, R) perturbation,
   limited to the L-inf budget (eps 16/255 officially; 8/255 with ``--eps 8/255``). It is
   trained over the whole set with Adam (lr 1e-4, cosine schedule) to minimise
   KL(log_softmax(f(x + delta_k)) || softmax(c_{(k+1) mod K})): every image carrying delta_k
   looks, to the surrogate, like the next cluster's centre;
3. every image gets the perturbation of its cluster (nearest centre of its clean features),
   resized to the image.

Every fit records the cluster sizes and, per generator, the KL to its target centre on a fixed
set of images before and after training; :meth:`UnlearnableClusters.label_report` adds purity
and NMI against a folder's labels when it has them (read for that report only).

The fitted protector is the K centres and the K perturbations (plus a fingerprint of the
surrogate); saved with ``--save-protector`` it protects new images without retraining.
Cost: K * epochs passes of surrogate forward/backward over all N images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from protect.cluster import cluster_quality, kmeans
from protect.config import ConfigError
from protect.generator import Batch, FitScope, Generator, MethodConfig, register
from protect.models.clip import RANDOM_WEIGHTS, load_clip, resolve_clip_weights
from protect.models.ssl import SSLError, load_encoder
from protect.progress import NullReporter, Reporter
from protect.surrogates import SURROGATES, build_surrogate

SURROGATE_KINDS = ("clip", "ssl", "torchvision", "timm", "small-cnn", "resnet18")
BUDGET_MAPS = ("clamp", "scale")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Images the surrogate's fingerprint is taken on: fixed, so a protector can check that it is
# used with the surrogate it was fitted with.
_PROBE_IMAGES = 4
# Images the KL to each target centre is measured on, before and after its generator's training.
_KL_PROBE_IMAGES = 512


@dataclass
class UnlearnableClustersConfig(MethodConfig):
    """surrogate: ``clip`` (open_clip), ``ssl`` (a self-supervised encoder made with ``protect
    surrogate ssl``, see :mod:`protect.models.ssl`), ``torchvision``, ``timm``, or this project's
    ``small-cnn`` / ``resnet18``. surrogate_model: the model name within that family (open_clip
    ``RN50``, torchvision ``resnet50``, ...). surrogate_pretrained: open_clip's tag of the
    weights (``openai``). surrogate_weights: a local weights file; empty = open_clip's
    Hugging Face cache (CLIP) or torch hub's cache (torchvision); ``random`` = untrained
    (tests only).
    clusters / target_offset: K, and which centre cluster k is pushed to ((k + offset) mod K).
    epochs / lr / weight_decay / min_lr: generator training per cluster (Adam, cosine to min_lr).
    generator_width / generator_blocks: channels of the first layer and residual blocks.
    budget_map: ``scale`` the tanh output by eps (default), or ``clamp`` it to [-eps, eps] as the
        official code does (zero gradient wherever |tanh| > eps, most pixels at initialisation).
    """

    eps: float = 16 / 255
    resolution: int = 224
    batch_size: int = 256
    surrogate: str = "clip"
    surrogate_model: str = "RN50"
    surrogate_pretrained: str = "openai"
    surrogate_weights: str = ""
    clusters: int = 10
    target_offset: int = 1
    epochs: int = 50
    lr: float = 1e-4
    weight_decay: float = 5e-4
    min_lr: float = 1e-6
    generator_width: int = 64
    generator_blocks: int = 6
    budget_map: str = "scale"
    kmeans_iterations: int = 100

    def validate(self) -> None:
        super().validate()
        if self.surrogate not in SURROGATE_KINDS:
            raise ValueError(f"surrogate must be one of {', '.join(SURROGATE_KINDS)}; got {self.surrogate!r}")
        if self.budget_map not in BUDGET_MAPS:
            raise ValueError(f"budget_map must be one of {', '.join(BUDGET_MAPS)}; got {self.budget_map!r}")
        if self.clusters < 2:
            raise ValueError(f"clusters must be at least 2; got {self.clusters}")
        if self.epochs < 1 or self.generator_width < 1 or self.generator_blocks < 0 or self.kmeans_iterations < 1:
            raise ValueError("epochs, generator_width and kmeans_iterations must be >= 1, generator_blocks >= 0")
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError("lr must be positive, min_lr and weight_decay >= 0")


# The perturbation generator ---------------------------------------------------------------


class _ResidualBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3, bias=False), nn.BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class PerturbationGenerator(nn.Module):
    """ResNet encoder/decoder (the official ``ResnetGenerator`` layout: 7x7 stem, two stride-2
    downsamplings, ``blocks`` residual blocks, two transposed-conv upsamplings, 7x7 head, tanh),
    batch norm and ReLU. (N, 3, R, R) -> (N, 3, R, R) in [-1, 1]; R divisible by 4."""

    def __init__(self, width: int = 64, blocks: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(3, width, 7, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(width * mult, width * mult * 2, 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width * mult * 2), nn.ReLU(True)]
        layers += [_ResidualBlock(width * 4) for _ in range(blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(width * mult, width * mult // 2, 3, stride=2, padding=1, output_padding=1, bias=False),
                       nn.BatchNorm2d(width * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, 3, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def to_budget(raw: torch.Tensor, eps: float, budget_map: str) -> torch.Tensor:
    """The generator's tanh output as an L-inf perturbation of at most ``eps``."""
    return raw.clamp(-eps, eps) if budget_map == "clamp" else raw * eps


def random_crop_flip(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The official training augmentation at any size: upscale by 256/224, random crop back,
    random horizontal flip, independently per image. images: float (N, 3, R, R)."""
    n, _, r, _ = images.shape
    big = max(r + 1, round(r * 256 / 224))
    upscaled = F.interpolate(images, size=(big, big), mode="bilinear", align_corners=False)
    top = torch.randint(0, big - r + 1, (n,), generator=gen)
    left = torch.randint(0, big - r + 1, (n,), generator=gen)
    steps = torch.arange(r)
    rows = (top[:, None] + steps)[:, :, None]
    cols = (left[:, None] + steps)[:, None, :]
    flip = torch.rand(n, generator=gen) < 0.5
    cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
    crops = upscaled[torch.arange(n)[:, None, None], :, rows.to(images.device), cols.to(images.device)]
    return crops.permute(0, 3, 1, 2).contiguous()


# Surrogate feature extractors ------------------------------------------------------------

Embed = Callable[[torch.Tensor], torch.Tensor]


def _read_state_file(path: str) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file (weights only), unwrapping ``state_dict``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _normalised(model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], size: int | None) -> Embed:
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def embed(images: torch.Tensor) -> torch.Tensor:
        if size is not None and images.shape[-1] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return model((images - mean_t.to(images.device)) / std_t.to(images.device))

    return embed


def _require_file(cfg: UnlearnableClustersConfig, advice: str) -> str:
    weights = cfg.surrogate_weights
    if weights == RANDOM_WEIGHTS:
        return weights
    if not weights:
        raise ConfigError(f"surrogate {cfg.surrogate}:{cfg.surrogate_model} needs weights: {advice}")
    if not Path(weights).expanduser().is_file():
        raise ConfigError(f"surrogate_weights file not found: {weights}; {advice}")
    return str(Path(weights).expanduser())


def _torchvision_weights(cfg: UnlearnableClustersConfig) -> str:
    import torchvision

    try:
        url = torchvision.models.get_model_weights(cfg.surrogate_model).DEFAULT.url
    except ValueError:
        raise ConfigError(
            f"unknown torchvision model {cfg.surrogate_model!r}; available: {', '.join(torchvision.models.list_models())}"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not cfg.surrogate_weights and cached.is_file():
        return str(cached)
    return _require_file(cfg, f"download {url} and pass it with --set surrogate_weights=PATH (or put it at {cached})")


def resolve_surrogate_weights(cfg: UnlearnableClustersConfig) -> str:
    """The weights file the surrogate will load (or ``random``); a :class:`ConfigError` that
    says what to download when it is missing. Cheap: nothing is loaded."""
    if cfg.surrogate == "clip":
        try:
            return resolve_clip_weights(cfg.surrogate_model, cfg.surrogate_pretrained, cfg.surrogate_weights)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
    if cfg.surrogate == "torchvision":
        return _torchvision_weights(cfg)
    if cfg.surrogate == "ssl":
        return _require_file(cfg, "make a self-supervised encoder from unlabelled pictures with `protect surrogate ssl "
                                  "IMAGES_DIR OUT_DIR` and pass OUT_DIR/encoder.safetensors with --set surrogate_weights=PATH")
    if cfg.surrogate == "timm":
        return _require_file(cfg, f"download the weights of timm's {cfg.surrogate_model} (huggingface.co/timm) "
                                  "and pass the file with --set surrogate_weights=PATH")
    return _require_file(cfg, f"train a {cfg.surrogate} classifier and pass its state dict (.safetensors or .pt) "
                              "with --set surrogate_weights=PATH")


def build_embedder(cfg: UnlearnableClustersConfig, weights: str, device: torch.device) -> Embed:
    """The surrogate's embedding function: float (N, 3, H, W) in [0, 1] -> (N, D), the input of
    its classification layer (CLIP: the image embedding), as the official code hooks ``fc``.
    Eval mode, no parameter gradients; random weights are seeded with 0."""
    random_init = weights == RANDOM_WEIGHTS
    if cfg.surrogate == "clip":
        return load_clip(cfg.surrogate_model, pretrained=cfg.surrogate_pretrained, weights=weights, device=device).encode_image
    if cfg.surrogate == "ssl":
        if random_init:
            raise ConfigError("surrogate ssl needs a trained encoder (surrogate_weights=PATH), not random weights")
        try:
            return load_encoder(weights, device).embed
        except SSLError as exc:
            raise ConfigError(str(exc)) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, mean, std, size = _headless_model(cfg, weights, random_init)
    model.to(device).eval().requires_grad_(False)
    if cfg.surrogate in SURROGATES:
        return model.embed
    return _normalised(model, mean, std, size)


def _headless_model(cfg: UnlearnableClustersConfig, weights: str, random_init: bool) -> tuple[nn.Module, Any, Any, int | None]:
    if cfg.surrogate in SURROGATES:
        state = {} if random_init else _read_state_file(weights)
        num_classes = state["head.weight"].shape[0] if "head.weight" in state else 10
        model = build_surrogate(cfg.surrogate, num_classes)
        if state:
            model.load_state_dict(state)
        return model, None, None, None
    if cfg.surrogate == "timm":
        import timm

        model = timm.create_model(cfg.surrogate_model, pretrained=False)
        if not random_init:
            model.load_state_dict(_read_state_file(weights))
        model.reset_classifier(0)
        data = model.pretrained_cfg
        return model, data.get("mean", IMAGENET_MEAN), data.get("std", IMAGENET_STD), data.get("input_size", (3, 224, 224))[-1]
    import torchvision

    model = torchvision.models.get_model(cfg.surrogate_model, weights=None)
    if not random_init:
        model.load_state_dict(_read_state_file(weights))
    _drop_classifier(model, cfg.surrogate_model)
    return model, IMAGENET_MEAN, IMAGENET_STD, 224


def _drop_classifier(model: nn.Module, name: str) -> None:
    """Replace the last linear layer by identity, so the model returns what that layer saw."""
    for attribute in ("fc", "head", "heads", "classifier"):
        layer = getattr(model, attribute, None)
        if isinstance(layer, nn.Linear):
            setattr(model, attribute, nn.Identity())
            return
        if isinstance(layer, nn.Sequential) and isinstance(layer[-1], nn.Linear):
            layer[-1] = nn.Identity()
            return
    raise ConfigError(f"torchvision {name}: no final linear layer (fc, head, heads or classifier) to take features before")


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(255) if images.dtype == torch.uint8 else images.float()


# The method -------------------------------------------------------------------------------


@register("clusters")
class UnlearnableClusters(Generator):
    summary = "Unlearnable Clusters: label-agnostic cluster-wise noise against a CLIP surrogate (Zhang et al., CVPR 2023)."
    config_class = UnlearnableClustersConfig
    needs_labels = False
    #: perturb depends only on the image (its nearest cluster centre), so a saved protector
    #: protects images it was not fitted on.
    fit_scope = FitScope.ANY_IMAGE

    def __init__(self, config: UnlearnableClustersConfig, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        super().__init__(config, device=device, seed=seed)
        self.weights = resolve_surrogate_weights(config)
        self._embed: Embed | None = None
        self.centres: torch.Tensor | None = None
        self.assignments: torch.Tensor | None = None
        self.deltas: torch.Tensor | None = None
        self.summary_facts: dict[str, Any] = {}

    # features and clusters --------------------------------------------------------------
    def embedder(self) -> Embed:
        if self._embed is None:
            self._embed = build_embedder(self.config, self.weights, self.device)
        return self._embed

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """float32 surrogate features (N, D) of images (uint8, or float in [0, 1]), computed in
        float32 (not autocast) so that fit and later protection assign the same clusters."""
        embed = self.embedder()
        chunks = [embed(_as_unit_float(chunk.to(self.device))).float().cpu() for chunk in images.split(self.config.batch_size)]
        return torch.cat(chunks)

    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Index of the nearest cluster centre for each row of ``features`` (N, D)."""
        return torch.cdist(features, self.centres).argmin(dim=1)

    def _fingerprint(self) -> torch.Tensor:
        probe = torch.rand((_PROBE_IMAGES, 3, self.config.resolution, self.config.resolution),
                           generator=torch.Generator().manual_seed(0))
        return self.features(probe)

    # fit ----------------------------------------------------------------------------------
    def cluster(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k-means of the surrogate features of ``images`` (uint8 (N, 3, R, R)): the assignments
        (N,) and the centres (K, D), deterministic for the seed. No labels are involved."""
        k = min(self.config.clusters, len(images))
        return kmeans(self.features(images), k, seed=self.seed, iterations=self.config.kmeans_iterations)

    def fit(self, images: torch.Tensor, labels: torch.Tensor | None = None, reporter: Reporter | None = None) -> None:
        """images: uint8 (N, 3, R, R). ``labels`` are never read: the method is label-agnostic
        (how well the clusters follow labels is reported separately, by :meth:`label_report`)."""
        del labels
        reporter = reporter or NullReporter()
        cfg: UnlearnableClustersConfig = self.config
        if self.weights == RANDOM_WEIGHTS:
            reporter.message("clusters: the surrogate is randomly initialised (surrogate_weights=random): "
                             "for tests only, the protection will be weak", "warning")
        x_all = images  # uint8; batches become float one at a time (224 px sets are large)
        if len(images) < cfg.clusters:
            reporter.message(f"clusters: only {len(images)} images, so {len(images)} clusters instead of {cfg.clusters}", "warning")
        with reporter.phase("clusters: surrogate features and k-means", total=None):
            self.assignments, self.centres = self.cluster(x_all)
        k = len(self.centres)
        sizes = torch.bincount(self.assignments, minlength=k).tolist()
        reporter.message(f"clusters: {k} clusters of sizes {', '.join(map(str, sizes))}")
        probe = x_all[torch.randperm(len(x_all), generator=torch.Generator().manual_seed(self.seed))[:_KL_PROBE_IMAGES]]
        deltas, kl = [], []
        for cluster in range(k):
            target = (cluster + cfg.target_offset) % k
            delta, record = self._train_cluster_delta(x_all, probe, self.centres[target], cluster, k, reporter)
            deltas.append(delta)
            kl.append({"cluster": cluster, "target": target, **record})
            reporter.message(f"clusters: generator {cluster + 1}/{k} (size {sizes[cluster]}): KL to centre {target} "
                             f"{record['start']:.4f} -> {record['end']:.4f} (clean images: {record['clean']:.4f}); "
                             f"{record['hit_rate']:.0%} of perturbed probe images nearest to centre {target}")
        self.deltas = torch.stack(deltas)
        self.summary_facts = {
            "clusters": k, "cluster_sizes": sizes, "kl": kl,
            # this project's CNNs are named by `surrogate` alone; CLIP, timm and torchvision by the model too
            "surrogate": cfg.surrogate if cfg.surrogate in (*SURROGATES, "ssl") else f"{cfg.surrogate}:{cfg.surrogate_model}",
            "surrogate_weights": self.weights if self.weights == RANDOM_WEIGHTS else Path(self.weights).name,
        }

    def label_report(self, labels: torch.Tensor) -> dict[str, Any]:
        """Purity and NMI of the fitted clusters against the folder's labels, and each cluster's
        majority label: a report on the surrogate, read after the fit, never by it."""
        if self.assignments is None or len(labels) != len(self.assignments):
            return {}
        return {"cluster_quality": cluster_quality(self.assignments, labels)}

    @torch.no_grad()
    def _probe_kl(self, probe: torch.Tensor, delta: torch.Tensor, goal: torch.Tensor, target: int) -> tuple[float, float]:
        """KL to the target centre's softmax and the share of images whose features are nearest
        to that centre, for the probe images (no augmentation) carrying ``delta``, in float32."""
        features = self.features((_as_unit_float(probe) + delta.cpu()).clamp(0, 1))
        kl = F.kl_div(features.log_softmax(dim=-1), goal.cpu().expand(len(features), -1), reduction="batchmean")
        return float(kl), float((self.assign(features) == target).float().mean())

    def _train_cluster_delta(
        self, x_all: torch.Tensor, probe: torch.Tensor, target: torch.Tensor, cluster: int, k: int, reporter: Reporter
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Train cluster ``cluster``'s generator over the whole set; return its perturbation
        (3, R, R) and a record of the KL on the probe images before and after training (and
        without noise), the mean training KL of each epoch and the final hit rate."""
        cfg: UnlearnableClustersConfig = self.config
        gen = torch.Generator().manual_seed(self.seed * 1_000 + cluster)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000 + cluster)
            net = PerturbationGenerator(cfg.generator_width, cfg.generator_blocks).to(self.device).train()
        noise = torch.rand((1, 3, cfg.resolution, cfg.resolution), generator=gen).to(self.device)
        batches = -(-len(x_all) // cfg.batch_size)
        optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * batches, eta_min=cfg.min_lr)
        goal = target.float().softmax(dim=-1).to(self.device)[None]
        target_index = (cluster + cfg.target_offset) % k
        clean_kl, _ = self._probe_kl(probe, torch.zeros(()), goal, target_index)
        with torch.no_grad():
            start_kl, _ = self._probe_kl(probe, to_budget(net(noise), cfg.eps, cfg.budget_map)[0], goal, target_index)
        embed = self.embedder()
        epoch_kl: list[float] = []
        with reporter.phase(f"clusters: generator {cluster + 1}/{k}", total=cfg.epochs) as phase:
            for _ in range(cfg.epochs):
                total = 0.0
                for idx in torch.randperm(len(x_all), generator=gen).split(cfg.batch_size):
                    clean = random_crop_flip(_as_unit_float(x_all[idx]), gen).to(self.device)
                    delta = to_budget(net(noise), cfg.eps, cfg.budget_map)
                    with self.autocast():
                        features = embed((clean + delta).clamp(0, 1))
                    loss = F.kl_div(features.float().log_softmax(dim=-1), goal.expand(len(idx), -1), reduction="batchmean")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    total += float(loss.detach()) * len(idx)
                epoch_kl.append(round(total / len(x_all), 5))
                phase.describe(f"clusters: generator {cluster + 1}/{k}, KL to centre {target_index}: {epoch_kl[-1]:.4f}")
                phase.advance()
        # As in the official code the perturbation is read out in training mode (batch statistics
        # of the fixed input), right after the last step.
        with torch.no_grad():
            delta = to_budget(net(noise), cfg.eps, cfg.budget_map)[0].float().cpu()
        end_kl, hit_rate = self._probe_kl(probe, delta, goal, target_index)
        record = {"clean": round(clean_kl, 5), "start": round(start_kl, 5), "end": round(end_kl, 5),
                  "hit_rate": round(hit_rate, 4), "epochs": epoch_kl}
        return delta, record

    # protect ------------------------------------------------------------------------------
    def perturb(self, batch: Batch) -> torch.Tensor:
        if self.deltas is None or self.centres is None:
            raise RuntimeError("clusters: call fit() (or load_state_dict()) before perturb()")
        clusters = self.assign(self.features(batch.images))
        return self.deltas[clusters].to(batch.images.device)

    def fit_summary(self) -> dict[str, Any]:
        return dict(self.summary_facts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.deltas is None or self.centres is None:
            return {}
        return {"centres": self.centres, "deltas": self.deltas, "surrogate_fingerprint": self._fingerprint()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a protector; refuses one fitted with another surrogate (its features of a
        fixed probe differ), since its cluster centres would then mean nothing."""
        expected = state["surrogate_fingerprint"].float()
        self.centres, self.deltas = state["centres"].float(), state["deltas"].float()
        if self.deltas.shape[-1] != self.config.resolution:
            raise ValueError(f"clusters: the protector's perturbations are {self.deltas.shape[-1]} px but resolution is "
                             f"{self.config.resolution}; use the protector's own config")
        found = self._fingerprint()
        if found.shape != expected.shape or not torch.allclose(found, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max())):
            raise ValueError(
                f"clusters: the surrogate ({self.config.surrogate}:{self.config.surrogate_model}, weights "
                f"{self.weights}) is not the one this protector was fitted with; load the same surrogate weights"
            )

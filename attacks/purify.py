"""Diffusion purification: the attacker's strongest known countermeasure to unlearnable data.

Every training image is diffused to a moderate timestep t* (Gaussian noise, q(x_t | x_0)), then
taken back to t = 0 by the reverse process of a DDPM trained on clean images; the noise swamps the
small protective perturbation and the reverse process puts back natural content. This is DiffPure
(Nie et al., ICML 2022, arXiv:2205.07460) used against availability poisons as AVATAR (Dolatabadi
et al. 2023, "The Devil's Advocate", arXiv:2303.08500).

The purifier is a diffusers checkpoint in ``save_pretrained`` layout (``DIR/unet`` with a
``UNet2DModel``, ``DIR/scheduler`` with DDPM betas), loaded from a local folder only: nothing is
downloaded. :func:`train_purifier` trains a small one on clean images the attacker owns. Images
are uint8 (N, 3, S, S) at the edges and float in [-1, 1] inside, as diffusers' pipelines use them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

from protect.images import atomic_open, write_text_atomic
from protect.models.diffusion import build_ddpm_scheduler, build_unet, diffusers_module
from protect.precision import autocast, resolved_precision
from protect.progress import NullReporter, Reporter
from protect.training_state import load_training_state, remove_training_state, save_training_state, tensor_fingerprint

if TYPE_CHECKING:  # diffusers is an optional dependency, imported where it is used
    from diffusers import DDPMScheduler, UNet2DModel

# Never ask a hub for anything: every checkpoint here is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
REQUIRED_FILES = ("unet/config.json", WEIGHTS, "scheduler/scheduler_config.json")
TRAINING_RECORD = "purifier.json"


class PurifierError(ValueError):
    """A purifier checkpoint is missing or unusable; the message says what to provide."""


def _diffusers() -> Any:
    try:
        return diffusers_module()
    except ImportError as exc:  # depends on the install
        raise PurifierError(str(exc)) from exc


def missing_purifier_message(path: Path | None, missing: list[str] | None = None) -> str:
    what = ("a purifier: a local diffusers checkpoint folder (save_pretrained layout) with "
            + ", ".join(REQUIRED_FILES) + ". Train one on clean images you own with "
            "`protect purifier train CLEAN_DIR OUT` and pass --purifier OUT, or pass the folder of a "
            "downloaded unconditional DDPM such as google/ddpm-cifar10-32 (nothing is downloaded at run time)")
    if path is None:
        return f"diffusion-purify needs {what}"
    if not Path(path).is_dir():
        return f"purifier folder not found: {path}; diffusion-purify needs {what}"
    return f"{path} is not a complete purifier: missing {', '.join(missing or [])}; diffusion-purify needs {what}"


@dataclass
class Purifier:
    """A loaded purifier: the noise-predicting UNet, its DDPM scheduler config and identity."""

    unet: "UNet2DModel"
    scheduler_config: dict[str, Any]
    fingerprint: str
    path: Path
    trained_t_max: int | None = None  # highest timestep it was trained on (None: all of them)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config["num_train_timesteps"])

    def scheduler(self) -> "DDPMScheduler":
        """A fresh DDPM scheduler (schedulers keep per-run state) with the checkpoint's betas."""
        return _diffusers().DDPMScheduler.from_config(self.scheduler_config)


def purifier_fingerprint(path: Path | str) -> str:
    """Names a purifier by its contents (weights and scheduler), not by where it lies."""
    path = Path(path)
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise PurifierError(missing_purifier_message(path, missing))
    digest = hashlib.sha256()
    for name in (WEIGHTS, "scheduler/scheduler_config.json"):
        with open(path / name, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def load_purifier(path: Path | str, *, device: torch.device | str = "cpu") -> Purifier:
    """Load the purifier at ``path`` (a local folder; a missing file raises :class:`PurifierError`
    naming it and saying how to provide one)."""
    path = Path(path)
    fingerprint = purifier_fingerprint(path)
    diffusers = _diffusers()
    # low_cpu_mem_usage=False: the plain loader, without asking for the optional `accelerate`
    unet = diffusers.UNet2DModel.from_pretrained(path, subfolder="unet", local_files_only=True, low_cpu_mem_usage=False)
    scheduler = diffusers.DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    record_file = path / TRAINING_RECORD
    trained_t_max = json.loads(record_file.read_text()).get("trained_t_max") if record_file.exists() else None
    unet = unet.to(device).eval().requires_grad_(False)
    return Purifier(unet, dict(scheduler.config), fingerprint, path, trained_t_max)


def timestep_of(purifier: Purifier, t_star: float) -> int:
    """t* as a fraction of the training horizon T, as an integer timestep."""
    if not 0 <= t_star < 1:
        raise PurifierError(f"t* is a fraction of the diffusion horizon, 0 <= t* < 1; got {t_star}")
    t = round(t_star * purifier.num_train_timesteps)
    if purifier.trained_t_max is not None and t > purifier.trained_t_max:
        raise PurifierError(f"{purifier.path} was trained on timesteps up to {purifier.trained_t_max} "
                            f"(t* <= {purifier.trained_t_max / purifier.num_train_timesteps:g}); t* = {t_star:g} "
                            "needs a purifier trained further (protect purifier train --max-t)")
    return t


def reverse_timesteps(t: int, steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from ``t`` down towards 0 (the respaced DDPM of Nichol &
    Dhariwal 2021); the last step jumps to t = 0."""
    if steps < 1:
        raise PurifierError(f"purification needs at least one reverse step; got {steps}")
    return sorted({round(t * (steps - i) / steps) for i in range(steps)} - {0}, reverse=True)


@torch.no_grad()
def purify(
    purifier: Purifier,
    images: torch.Tensor,
    *,
    t_star: float,
    steps: int = 10,
    seed: int = 0,
    batch_size: int = 250,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    reporter: Reporter | None = None,
) -> torch.Tensor:
    """Diffuse uint8 images (N, 3, S, S) to t* (a fraction of T) and denoise them back with
    ``steps`` ancestral DDPM steps; returns uint8 of the same shape. Deterministic for a seed
    (and batch size); t* = 0 returns the input unchanged."""
    reporter = reporter or NullReporter()
    device = torch.device(device)
    t = timestep_of(purifier, t_star)
    if t == 0 or len(images) == 0:
        return images.clone()
    size = purifier.unet.config.sample_size
    if images.shape[-2:] != (size, size):
        raise PurifierError(f"the purifier works at {size}x{size} px; these images are "
                            f"{images.shape[-1]}x{images.shape[-2]} (train a purifier at their size)")
    unet = purifier.unet.to(device)
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty_like(images)
    with reporter.phase(f"purifying {len(images)} images at t* = {t_star:g}T ({steps} steps)", total=len(images)) as phase:
        for start in range(0, len(images), batch_size):
            x0 = images[start:start + batch_size].float().div(127.5).sub(1)
            scheduler = purifier.scheduler()
            scheduler.set_timesteps(timesteps=reverse_timesteps(t, steps))
            x = scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen), torch.tensor([t]))
            for timestep in scheduler.timesteps:
                with autocast(device, precision):
                    eps = unet(x.to(device).contiguous(memory_format=torch.channels_last), timestep).sample
                x = scheduler.step(eps.float().cpu(), timestep, x, generator=gen).prev_sample
            out[start:start + len(x0)] = x.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
            phase.advance(len(x0))
    return out


class PurificationCache:
    """Purified sets on disk, keyed by the images' content, the purifier and the settings, so
    the same folder is purified once however many victims and verify runs train on it."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def key(self, images: torch.Tensor, purifier: Purifier, settings: dict[str, Any]) -> str:
        digest = hashlib.sha256(tensor_fingerprint(images).encode())
        digest.update(json.dumps({"purifier": purifier.fingerprint, **settings}, sort_keys=True).encode())
        return digest.hexdigest()[:24]

    def get(self, key: str) -> torch.Tensor | None:
        path = self.directory / f"{key}.safetensors"
        return load_file(str(path))["images"] if path.exists() else None

    def put(self, key: str, images: torch.Tensor) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.directory / f"{key}.safetensors", "wb") as handle:
            handle.write(save({"images": images.contiguous()}))


def default_cache_dir() -> Path:
    """Where purified sets are kept between runs: $XDG_CACHE_HOME/protect/purified."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "protect" / "purified"


def diffusion_purify(
    t_star: float = 0.1,
    steps: int = 10,
    seed: int = 0,
    purifier_id: str | None = None,
    *,
    purifier: Path | str | None = None,
    cache_dir: Path | str | None = None,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The verify countermeasure: a data transform that purifies the whole training set at t*.

    Settings (part of a run's identity): ``t_star`` (fraction of T), ``steps`` (reverse steps),
    ``seed`` (the purification noise: one purified set serves every victim seed, as an attacker
    purifies once) and ``purifier_id`` (the checkpoint's fingerprint). Resources (not part of it):
    the ``purifier`` folder, the ``cache_dir`` of purified sets, the device and a reporter."""
    if purifier is None:
        raise PurifierError(missing_purifier_message(None))
    if purifier_id is not None and purifier_fingerprint(purifier) != purifier_id:
        raise PurifierError(f"{purifier} is not the purifier this run was planned with ({purifier_id}); "
                            "its files changed since: start the verify run again")
    cache = PurificationCache(cache_dir) if cache_dir is not None else None
    settings = {"t_star": t_star, "steps": steps, "seed": seed,
                "precision": resolved_precision(torch.device(device), "auto")}

    def transform(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        loaded = load_purifier(purifier, device=device)
        key = cache.key(images, loaded, settings) if cache is not None else None
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            (reporter or NullReporter()).message(f"purified images (t* = {t_star:g}T) taken from {cache.directory}")
            return cached
        purified = purify(loaded, images, t_star=t_star, steps=steps, seed=seed, device=device, reporter=reporter)
        if cache is not None:
            cache.put(key, purified)
        return purified

    return transform


def plan_variants(purifier: Path | str | None, t_stars: list[float], steps: int = 10, seed: int = 0) -> list[dict[str, Any]]:
    """The settings of one verify row per t*, checked against the purifier before anything trains."""
    if purifier is None:
        raise PurifierError(missing_purifier_message(None))
    fingerprint = purifier_fingerprint(purifier)
    record_file = Path(purifier) / TRAINING_RECORD
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    config = json.loads((Path(purifier) / "scheduler" / "scheduler_config.json").read_text())
    horizon = int(config.get("num_train_timesteps", 1000))
    variants = []
    for t_star in t_stars:
        if not 0 < t_star < 1:
            raise PurifierError(f"t* is a fraction of the diffusion horizon, 0 < t* < 1; got {t_star}")
        t_max = record.get("trained_t_max")
        if t_max is not None and round(t_star * horizon) > t_max:
            raise PurifierError(f"{purifier} was trained on timesteps up to {t_max} (t* <= {t_max / horizon:g}); "
                                f"t* = {t_star:g} needs a purifier trained further (protect purifier train --max-t)")
        if steps < 1:
            raise PurifierError(f"purification needs at least one reverse step; got {steps}")
        variants.append({"t_star": t_star, "steps": steps, "seed": seed, "purifier_id": fingerprint})
    return variants


def example_rows(
    purifier: Path | str, clean: torch.Tensor, protected: torch.Tensor, variants: list[dict[str, Any]], *,
    device: torch.device | str = "cpu",
) -> list[tuple[str, torch.Tensor]]:
    """A few clean and protected images purified at each t*, for the card's example strip."""
    loaded = load_purifier(purifier, device=device)
    rows = []
    for settings in variants:
        for kind, images in (("clean", clean), ("protected", protected)):
            purified = purify(loaded, images, t_star=settings["t_star"], steps=settings["steps"],
                              seed=settings["seed"], device=device)
            rows.append((f"{kind}, purified\nt*={settings['t_star']:g}T", purified))
    return rows


def row_name(settings: dict[str, Any]) -> str:
    """How a purification row is named on the card: its t*."""
    return f"diffusion-purify t*={settings['t_star']:g}T"


# --- training a purifier ----------------------------------------------------------------------

@dataclass(frozen=True)
class PurifierTrainConfig:
    """A small DDPM (Ho et al. 2020, arXiv:2006.11239): epsilon prediction, linear betas
    1e-4..0.02 over T = 1000, AdamW with warm-up and cosine decay, EMA of the weights, random
    horizontal flips. Purification only runs the reverse process below t*, so by default the
    network is trained on timesteps up to ``max_t``·T only (a purifier, not a generator)."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 200
    ema_decay: float = 0.999
    max_t: float = 0.25
    num_train_timesteps: int = 1000
    channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    norm_groups: int = 16
    precision: str = "auto"
    save_every: int = 250


def build_purifier_unet(config: PurifierTrainConfig, size: int, *, seed: int) -> "UNet2DModel":
    """A randomly initialised purifier network of ``config``'s shape at ``size`` px."""
    return build_unet(size, config.channels, layers_per_block=config.layers_per_block,
                      norm_groups=config.norm_groups, seed=seed)


@dataclass
class TrainRecord:
    """What a purifier's training did so far (written as OUT/purifier.json)."""

    steps_done: int = 0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # mean loss per save interval


def _lr_factor(config: PurifierTrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_purifier(
    images: torch.Tensor,
    out: Path | str,
    config: PurifierTrainConfig = PurifierTrainConfig(),
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    minutes: float | None = None,
    source: str = "",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Train a DDPM purifier on clean uint8 images (N, 3, S, S) into ``out``; resumable.

    The training state goes to ``out/training.*`` every ``save_every`` steps and a run with the
    same images, config and seed continues from it. ``minutes`` saves and stops after that much
    wall time, so long trainings can run in steps. Each save also exports the EMA weights
    with diffusers' ``save_pretrained`` (``DDPMPipeline`` layout), so the folder is a usable
    purifier at every point; ``purifier.json`` says how far it is trained. Returns that record."""
    reporter = reporter or NullReporter()
    device = torch.device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = images.shape[-1]
    unet = build_purifier_unet(config, size, seed=seed).to(device=device, memory_format=torch.channels_last)
    ema = build_purifier_unet(config, size, seed=seed).to(device=device)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    nets = nn.ModuleDict({"unet": unet, "ema": ema})
    scheduler = build_ddpm_scheduler(config.num_train_timesteps)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config))
    gen = torch.Generator().manual_seed(seed)
    # as JSON stores it (tuples become lists), so that a saved identity compares equal
    identity = json.loads(json.dumps({"data": tensor_fingerprint(images), "config": asdict(config), "seed": seed}))
    state = out / "training"
    saved = load_training_state(state, nets, optimizer, schedule, gen, identity)
    record = TrainRecord(**saved["train"]) if saved is not None else TrainRecord()
    if saved is not None:
        reporter.message(f"resuming purifier training at step {record.steps_done} of {config.steps}")
    t_max = max(1, round(config.max_t * config.num_train_timesteps))
    alphas = scheduler.alphas_cumprod
    started = time.perf_counter() - record.seconds
    session_start = time.perf_counter()
    running: list[float] = []
    with reporter.phase("training purifier", total=config.steps) as phase:
        phase.advance(record.steps_done)
        while record.steps_done < config.steps:
            index = torch.randint(0, len(images), (config.batch_size,), generator=gen)
            x0 = images[index].float().div(127.5).sub(1)
            flip = torch.rand(len(x0), generator=gen) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
            t = torch.randint(0, t_max, (len(x0),), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(device).contiguous(memory_format=torch.channels_last)
            unet.train()
            with autocast(device, config.precision):
                predicted = unet(xt, t.to(device)).sample
            loss = F.mse_loss(predicted.float(), noise.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            decay = min(config.ema_decay, (1 + record.steps_done) / (10 + record.steps_done))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), unet.parameters()):
                    e.lerp_(p, 1 - decay)
            record.steps_done += 1
            running.append(loss.item())
            phase.advance()
            at_end = record.steps_done == config.steps
            out_of_time = minutes is not None and time.perf_counter() - session_start > 60 * minutes
            if record.steps_done % config.save_every == 0 or at_end or out_of_time:
                record.losses.append(sum(running) / len(running))
                running = []
                record.seconds = time.perf_counter() - started
                phase.describe(f"training purifier: step {record.steps_done}, loss {record.losses[-1]:.4f}")
                export_purifier(ema, scheduler, out, {
                    "trained_t_max": t_max - 1, "steps_done": record.steps_done, "steps": config.steps,
                    "seconds": round(record.seconds, 1), "losses": [round(v, 5) for v in record.losses],
                    "images": len(images), "source": source, "config": asdict(config), "seed": seed,
                    "precision": resolved_precision(device, config.precision), "finished": at_end,
                })
                if at_end:
                    remove_training_state(state)
                else:
                    save_training_state(state, nets, optimizer, schedule, gen,
                                         {"identity": identity, "step": record.steps_done, "train": asdict(record)})
                if out_of_time and not at_end:
                    reporter.message(f"stopped after {minutes:g} minutes at step {record.steps_done} of "
                                     f"{config.steps}; run the same command again to continue")
                    break
    return json.loads((out / TRAINING_RECORD).read_text())


def export_purifier(unet: "UNet2DModel", scheduler: "DDPMScheduler", out: Path, record: dict[str, Any]) -> None:
    """Write ``unet`` and ``scheduler`` as a diffusers ``DDPMPipeline`` folder (loadable with
    ``DDPMPipeline.from_pretrained(out)``), replacing an earlier export, plus ``purifier.json``."""
    pipeline = _diffusers().DDPMPipeline(unet=unet, scheduler=scheduler)
    staging = out / ".export"
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging, safe_serialization=True)
    for name in ("unet", "scheduler"):
        old = out / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if (out / name).exists():
            (out / name).rename(old)
        (staging / name).rename(out / name)
        shutil.rmtree(old, ignore_errors=True)
    (staging / "model_index.json").replace(out / "model_index.json")
    shutil.rmtree(staging, ignore_errors=True)
    write_text_atomic(out / TRAINING_RECORD, json.dumps(record, indent=2))


@torch.no_grad()
def denoising_error(
    purifier: Purifier, images: torch.Tensor, t_star: float, *, seed: int = 0, batch_size: int = 250,
    device: torch.device | str = "cpu", precision: str = "auto",
) -> float:
    """Mean squared error of the purifier's noise prediction at exactly t* on clean uint8 images
    (the DDPM training loss at that timestep; 1.0 is what predicting zero noise scores)."""
    device = torch.device(device)
    t = timestep_of(purifier, t_star)
    alpha = purifier.scheduler().alphas_cumprod[t]
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for start in range(0, len(images), batch_size):
        x0 = images[start:start + batch_size].float().div(127.5).sub(1)
        noise = torch.randn(x0.shape, generator=gen)
        xt = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
        with autocast(device, precision):
            predicted = purifier.unet(xt.to(device).contiguous(memory_format=torch.channels_last), t).sample
        total += F.mse_loss(predicted.float().cpu(), noise, reduction="sum").item()
    return total / images.numel()

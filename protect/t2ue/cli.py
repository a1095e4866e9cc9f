"""``protect t2ue train|noise|apply``: train a text-to-noise generator, make noise from a caption
alone, and add such noise to an image (T2UE, Ma et al., arXiv:2508.03091)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer
from PIL import Image

from protect import console
from protect.budget import apply_perturbation_uint8, budget_in_levels
from protect.config import ConfigError, build_config, parse_overrides, read_default_config, read_yaml
from protect.images import ImageReadError, load_image, save_image_atomic
from protect.models.clip import ClipWeightsNotFound
from protect.scale import to_image_size
from protect.t2ue.data import pairs_from_file, pairs_from_folder
from protect.t2ue.network import T2UEError, code_for, load_generator, noise_from_text
from protect.t2ue.training import T2UETrainConfig, train_generator

app = typer.Typer(help="T2UE: protective noise from a text description alone (Ma et al., arXiv:2508.03091).",
                  no_args_is_help=True, add_completion=False)
TRAIN_DEFAULTS = "t2ue-train.yaml"
# Noise files store each level as 128 + level in an 8-bit PNG (lossless; budgets up to 127/255).
NOISE_OFFSET = 128


def train_config(config_file: Optional[Path], overrides: dict) -> T2UETrainConfig:
    """Defaults < configs/t2ue-train.yaml < --config < --set."""
    layers = [read_default_config(TRAIN_DEFAULTS)]
    if config_file is not None:
        layers.append((str(config_file), read_yaml(config_file)))
    layers.append(("--set", overrides))
    return build_config(T2UETrainConfig, *layers)


@app.command()
def train(
    data: Path = typer.Argument(..., help="Image-text pairs: a labelled folder (captions from templates over the class "
                                "names) or a .csv/.jsonl of image,caption (paths relative to the file)."),
    out_dir: Path = typer.Argument(..., help="Where generator.safetensors/.yaml and the resumable checkpoint go."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML overriding configs/t2ue-train.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override one training key, e.g. --set epochs=50 (repeatable)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Labelled folders: the first N images of each class."),
    seed: int = typer.Option(0, "--seed", help="Random seed (initialisation, batches, codes)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
) -> None:
    """Train the text-to-noise generator against a frozen CLIP surrogate (InfoNCE, error-minimising).

    Rerun the same command after an interruption: it resumes from the last finished epoch.
    """
    torch_device = console.resolve_device(device)
    try:
        cfg = train_config(config, parse_overrides(set_))
        if data.is_dir():
            pairs = pairs_from_folder(data, cfg.resolution, cfg.templates, per_class)
        else:
            pairs = pairs_from_file(data, cfg.resolution)
    except (ConfigError, T2UEError, ImageReadError) as exc:
        raise console.fail(str(exc)) from None
    with console.progress_display() as progress:
        try:
            summary = train_generator(pairs, cfg, out_dir, device=torch_device, seed=seed, reporter=console.RichReporter(progress))
        except (T2UEError, ClipWeightsNotFound, ValueError) as exc:
            raise console.fail(str(exc)) from None
    losses = summary.epoch_losses
    console.out.print(f"generator: {summary.generator} ({len(pairs)} pairs, {len(pairs.texts)} captions, {summary.seconds:.1f} s); "
                  f"InfoNCE first epoch {losses[0]:.4f}, last {losses[-1]:.4f}", highlight=False)


def _parse_size(size: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise console.fail(f"--size is WIDTHxHEIGHT, e.g. 640x480; got {size!r}") from None
    if width < 1 or height < 1:
        raise console.fail(f"--size must be positive; got {size!r}")
    return width, height


@app.command()
def noise(
    text: str = typer.Argument(..., help="The image's description, e.g. \"a photo of my dog on the beach\"."),
    out: Path = typer.Option(..., "--out", help="Noise PNG to write (each level stored as 128 + level)."),
    generator: Path = typer.Option(..., "--generator", help="A trained generator (.safetensors, its .yaml beside it)."),
    size: str = typer.Option(..., "--size", help="WIDTHxHEIGHT of the image the noise is for."),
    clip_weights: Optional[str] = typer.Option(None, "--clip-weights", help="Local weights of the generator's CLIP "
                                               "(default: open_clip's Hugging Face cache)."),
    seed: int = typer.Option(0, "--seed", help="Picks the random code z: same text and seed, same noise."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
) -> None:
    """Write the protective noise for TEXT alone: no image is read. Add it with `protect t2ue apply`."""
    width, height = _parse_size(size)
    try:
        loaded = load_generator(generator, clip_weights=clip_weights, device=console.resolve_device(device), clip_option="--clip-weights")
    except (T2UEError, ClipWeightsNotFound, ValueError) as exc:
        raise console.fail(str(exc)) from None
    delta = noise_from_text(loaded, [text], code_for(text, seed, loaded.net.spec.z_dim)[None])[0]
    levels = np.rint(to_image_size(delta, width, height) * 255).clip(-budget_in_levels(loaded.eps), budget_in_levels(loaded.eps))
    save_image_atomic(out, (levels + NOISE_OFFSET).astype(np.uint8), None, "png")
    console.out.print(f"noise for {text!r}: {out} ({width}x{height}, at most {budget_in_levels(loaded.eps)}/255)", highlight=False)


@app.command()
def apply(
    image: Path = typer.Argument(..., help="The image to protect (never modified)."),
    noise_file: Path = typer.Argument(..., help="A noise PNG from `protect t2ue noise` (resized to the image if needed)."),
    out: Path = typer.Argument(..., help="The protected copy (PNG, lossless)."),
    eps: str = typer.Option("8/255", "--eps", help="The budget the noise was made for; larger levels are refused."),
) -> None:
    """Add a noise PNG to an image: out = clip(image + noise, 0, 255), within the budget."""
    eps_value = console.parse_eps(eps)
    if out.resolve() == image.resolve():
        raise console.fail("the output would replace the original image; choose another path")
    try:
        original = load_image(image)
        stored = load_image(noise_file).rgb.astype(np.int16) - NOISE_OFFSET
    except ImageReadError as exc:
        raise console.fail(f"{exc.path}: {exc.reason}") from None
    if np.abs(stored).max() > budget_in_levels(eps_value):
        raise console.fail(f"{noise_file} has levels up to {np.abs(stored).max()}, more than --eps {eps} allows")
    width, height = original.size
    if stored.shape[:2] != (height, width):
        resized = Image.fromarray((stored + NOISE_OFFSET).astype(np.uint8)).resize((width, height), Image.Resampling.NEAREST)
        stored = np.asarray(resized).astype(np.int16) - NOISE_OFFSET
    protected = apply_perturbation_uint8(original.rgb, stored.astype(np.float32) / 255, eps_value)
    save_image_atomic(out, protected, original.alpha, "png", original.icc_profile)
    console.out.print(f"protected copy: {out} (max change {int(np.abs(protected.astype(np.int16) - original.rgb).max())}/255)", highlight=False)

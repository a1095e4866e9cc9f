"""``protect surrogate ssl``: train a label-free image encoder (SimCLR) on a folder of the user's
own pictures, to use as the ``clusters`` surrogate where no pretrained CLIP is at hand."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import typer

from protect import console
from protect.config import ConfigError, parse_overrides
from protect.images import ImageReadError, load_image, scan_folder
from protect.models.ssl import SSLError, train_config, train_encoder
from protect.scale import working_tensor

app = typer.Typer(help="Train surrogate models that methods embed images with.", no_args_is_help=True, add_completion=False)


def read_unlabelled(folder: Path, resolution: int, reporter) -> torch.Tensor:
    """Every readable image under ``folder`` (recursively; subfolder names are not read) as
    uint8 (N, 3, R, R); unreadable files are reported and skipped."""
    entries = scan_folder(folder).entries
    images = []
    with reporter.phase("reading images", total=len(entries)) as phase:
        for entry in entries:
            try:
                images.append(working_tensor(load_image(entry.path), resolution))
            except ImageReadError as exc:
                reporter.message(f"{exc.path}: {exc.reason}; skipped", "warning")
            phase.advance()
    if not images:
        raise SSLError(f"no readable images found in {folder}")
    return torch.stack(images)


@app.command()
def ssl(
    images_dir: Path = typer.Argument(..., help="Folder of unlabelled pictures (read recursively, never modified; "
                                      "subfolder names are ignored): the pictures you will protect, or more of the "
                                      "same kind."),
    out_dir: Path = typer.Argument(..., help="Where encoder.safetensors, encoder.json and the resumable checkpoint go."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML overriding configs/surrogate-ssl.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override one training key, e.g. --set epochs=50 (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (initialisation, batches, augmentations)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
) -> None:
    """Train a self-supervised image encoder (SimCLR; no labels) and save it for `clusters`.

    Use it with: protect run clusters PHOTOS OUT --set surrogate=ssl --set surrogate_weights=OUT_DIR/encoder.safetensors.
    Rerun the same command after an interruption: it resumes from the last finished epoch.
    """
    torch_device = console.resolve_device(device)
    if not images_dir.is_dir():
        raise console.fail(f"{images_dir} is not a folder of images")
    try:
        cfg = train_config(config, parse_overrides(set_))
    except ConfigError as exc:
        raise console.fail(str(exc)) from None
    with console.progress_display() as progress:
        reporter = console.RichReporter(progress)
        try:
            images = read_unlabelled(images_dir, cfg.resolution, reporter)
            summary = train_encoder(images, cfg, out_dir, device=torch_device, seed=seed, reporter=reporter,
                                    source=str(images_dir))
        except SSLError as exc:
            raise console.fail(str(exc)) from None
    losses = summary.epoch_losses
    console.out.print(f"encoder: {summary.weights} ({len(images)} images, {summary.seconds:.1f} s); NT-Xent first epoch "
                  f"{losses[0]:.4f}, last {losses[-1]:.4f}", highlight=False)
    console.out.print(f"use it with: protect run clusters IMAGES OUT --set surrogate=ssl --set surrogate_weights={summary.weights}",
                  highlight=False)

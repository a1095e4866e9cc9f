"""``protect purifier``: train the diffusion purifier that ``protect verify``'s ``diffusion-purify``
countermeasure uses (added through the ``protect.commands`` entry point with ``verify``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from protect.console import RichReporter, err, fail, out, progress_display, resolve_device

purifier_app = typer.Typer(help="Train and inspect the diffusion purifier used by `protect verify`'s diffusion-purify.",
                           no_args_is_help=True)


@purifier_app.command("train")
def train(
    clean_dir: Path = typer.Argument(..., help="Clean images the attacker owns (any folder tree; labels are not used). "
                                     "Keep it disjoint from the protected images."),
    out_dir: Path = typer.Argument(..., help="Output folder: a diffusers checkpoint (DDPMPipeline layout, "
                                   "save_pretrained) plus purifier.json; an unfinished training there is resumed."),
    steps: int = typer.Option(3000, "--steps", help="Optimisation steps in all."),
    batch_size: int = typer.Option(64, "--batch-size"),
    max_t: float = typer.Option(0.25, "--max-t", help="Train on timesteps up to this fraction of T: purification "
                                "only ever runs below t*, so a purifier need not learn the rest."),
    channels: str = typer.Option("32,64,64", "--channels", help="UNet width per resolution level."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Save and stop after this many minutes; "
                                            "run again to continue."),
    resolution: int = typer.Option(32, "--resolution", help="Square size the purifier works at (pixels)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
) -> None:
    """Train a small DDPM on clean images, for diffusion purification (resumable)."""
    from attacks.data import load_images
    from attacks.purify import PurifierError, PurifierTrainConfig, train_purifier

    torch_device = resolve_device(device)
    try:
        config = PurifierTrainConfig(steps=steps, batch_size=batch_size, max_t=max_t,
                                     channels=tuple(int(c) for c in channels.split(",")))
    except ValueError:
        raise fail(f"--channels is a comma list of integers; got {channels!r}") from None
    if not 0 < max_t <= 1:
        raise fail(f"--max-t is a fraction of T in (0, 1]; got {max_t}")
    if not clean_dir.is_dir():
        raise fail(f"clean image folder not found: {clean_dir}")
    try:
        images, problems = load_images(clean_dir, size=resolution)
    except ValueError as exc:
        raise fail(str(exc)) from None
    for problem in problems:
        err.print(f"[yellow]warning:[/yellow] skipped {problem}", markup=True, highlight=False)
    err.print(f"purifier: {len(images)} images from {clean_dir}, {steps} steps of {batch_size}", highlight=False)
    try:
        with progress_display() as progress:
            record = train_purifier(images, out_dir, config, seed=seed, device=torch_device, minutes=minutes,
                                    source=str(clean_dir), reporter=RichReporter(progress))
    except PurifierError as exc:
        raise fail(str(exc)) from None
    state = "finished" if record["finished"] else f"{record['steps_done']} of {record['steps']} steps"
    out.print(f"purifier in {out_dir} ({state}, {record['seconds']:.0f} s of training, last loss "
              f"{record['losses'][-1]:.4f}); use it with protect verify --countermeasures diffusion-purify "
              f"--purifier {out_dir}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(purifier_app, name="purifier")

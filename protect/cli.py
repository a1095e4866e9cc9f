"""The ``protect`` command line: a thin layer over :mod:`protect.pipeline`."""

from __future__ import annotations

import math
from importlib import metadata
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from protect.config import ConfigError, parse_number, parse_overrides
from protect.generator import available_methods, describe_fields
from protect.images import DEFAULT_MAX_PIXELS, OUTPUT_FORMATS
from protect.pipeline import RunSummary, UsageError, protect_folder

app = typer.Typer(
    help="Make image folders unlearnable: add bounded, imperceptible noise so that models "
    "trained on the copy fail on clean data. Originals are never modified.",
    no_args_is_help=True,
    add_completion=False,
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

USAGE_ERROR = 2


class RichReporter:
    """Progress bars and messages on stderr, so stdout keeps only the summary."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    @contextmanager
    def phase(self, title: str, total: int | None) -> Iterator["_RichPhase"]:
        task = self.progress.add_task(title, total=total)
        phase = _RichPhase(self.progress, task)
        try:
            yield phase
        finally:
            # Finished phases collapse into one line, so long fits do not flood the terminal.
            info = next(t for t in self.progress.tasks if t.id == task)
            elapsed, description = info.elapsed or 0.0, info.description
            self.progress.remove_task(task)
            self.progress.console.print(f"[green]done[/green] {description} ({elapsed:.1f} s)", markup=True, highlight=False)

    def message(self, text: str, level: str = "info") -> None:
        style = {"error": "red", "warning": "yellow"}.get(level, "dim")
        prefix = {"error": "error: ", "warning": "warning: "}.get(level, "")
        self.progress.console.print(f"[{style}]{prefix}[/{style}]{escape(text)}", markup=True, highlight=False)


def progress_display() -> Progress:
    """The progress bars every command draws on stderr."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=err)


class _RichPhase:
    def __init__(self, progress: Progress, task: int) -> None:
        self.progress, self.task = progress, task

    def advance(self, amount: int = 1) -> None:
        self.progress.advance(self.task, amount)

    def describe(self, text: str) -> None:
        self.progress.update(self.task, description=text)


def fail(message: str) -> typer.Exit:
    err.print(f"[red]Error:[/red] {escape(message)}", markup=True, highlight=False)
    return typer.Exit(USAGE_ERROR)


def _parse_eps(value: Optional[str]) -> float | None:
    if value is None:
        return None
    try:
        eps = parse_number(value)
    except (ValueError, ZeroDivisionError):
        raise fail(f"--eps must be a number such as 8/255 or 0.0314; got {value!r}") from None
    if not 0 < eps < 1:
        raise fail(f"--eps is in [0, 1] pixel units, e.g. 8/255; got {value!r}")
    return eps


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise fail(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def _print_summary(summary: RunSummary) -> None:
    table = Table(title=f"protect run {summary.method}", show_header=False)
    table.add_row("input", escape(str(summary.input_dir)))
    table.add_row("output", escape(str(summary.output_dir)))
    table.add_row("images written", str(summary.written))
    if summary.already_done:
        table.add_row("already done (resume)", str(summary.already_done))
    table.add_row("failed", str(len(summary.failed)))
    if summary.not_images:
        table.add_row("skipped (not images)", str(len(summary.not_images)))
    table.add_row("labels", summary.labels)
    table.add_row("max |out - in|", f"{summary.max_levels} / 255")
    if summary.mean_psnr is not None:
        shown = "identical" if math.isinf(summary.mean_psnr) else f"{summary.mean_psnr:.2f} dB"
        table.add_row("mean PSNR", shown)
    if summary.mean_ssim is not None:
        table.add_row("mean SSIM", f"{summary.mean_ssim:.4f}")
    table.add_row("time", f"{summary.seconds:.1f} s (fit {summary.fit_seconds:.1f} s)")
    out.print(table)
    for failure in summary.failed:
        out.print(f"[red]failed:[/red] {escape(failure.path)}: {escape(failure.reason)}", markup=True, highlight=False)


@app.command()
def run(
    method: str = typer.Argument(..., help="Noise method; `protect methods` lists them."),
    input_dir: Path = typer.Argument(..., help="Folder of images (read recursively, never modified). "
                                     "One subfolder per class gives labels; a flat folder is clustered."),
    output_dir: Path = typer.Argument(..., help="Where the protected copy goes (must be outside INPUT_DIR)."),
    eps: Optional[str] = typer.Option(None, "--eps", help="L-inf budget, e.g. 8/255 (default: the method's config)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file overriding the method's defaults."),
    set_: list[str] = typer.Option([], "--set", help="Override one config key, e.g. --set steps=10 (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed and input give the same output."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    output_format: str = typer.Option("png", "--format", help=f"Output format: {', '.join(OUTPUT_FORMATS)}. "
                                      "png, tiff and webp are written losslessly."),
    allow_lossy: bool = typer.Option(False, "--allow-lossy", help="Permit a lossy --format (jpeg); it weakens the protection."),
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run into the same output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty output folder, replacing files."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="Refuse images larger than this (decompression-bomb guard)."),
) -> None:
    """Write a protected copy of INPUT_DIR to OUTPUT_DIR.

    Exit code: 0 every image written, 1 some files failed (listed), 2 usage error.
    """
    eps_value = _parse_eps(eps)
    torch_device = resolve_device(device)
    try:
        overrides = parse_overrides(set_)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    with progress_display() as progress:
        try:
            summary = protect_folder(
                method, input_dir, output_dir, eps=eps_value, config_file=config, overrides=overrides,
                seed=seed, device=torch_device, output_format=output_format, allow_lossy=allow_lossy,
                resume=resume, overwrite=overwrite, max_pixels=max_pixels, reporter=RichReporter(progress),
            )
        except UsageError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            err.print(
                f"[yellow]Interrupted.[/yellow] Files written so far are complete; run the same command with "
                f"--resume to finish into {output_dir}.",
                markup=True, highlight=False,
            )
            raise typer.Exit(130) from None
    _print_summary(summary)
    raise typer.Exit(summary.exit_code)


@app.command()
def methods(keys: bool = typer.Option(False, "--keys", help="Also list each method's config keys.")) -> None:
    """List the available noise methods; `--keys` adds their config keys."""
    table = Table(title="methods (defaults in configs/<name>.yaml; change with --set key=value)")
    table.add_column("name", no_wrap=True)
    table.add_column("labels")
    table.add_column("what it does")
    for name, cls in available_methods().items():
        labels = "used (k-means pseudo-labels if absent)" if cls.needs_labels else "not used"
        table.add_row(name, labels, cls.summary)
        if keys:
            table.add_row("", "", "[dim]keys: " + ", ".join(describe_fields(cls.config_class)) + "[/dim]")
    out.print(table)


def _load_plugins() -> None:
    """Commands contributed by other packages (``verify`` comes from ``attacks``)."""
    for entry_point in metadata.entry_points(group="protect.commands"):
        entry_point.load()(app)


if __name__ == "__main__":
    # Run the importable module's app, so plugins that import protect.cli see one module.
    from protect.cli import app as installed_app

    installed_app()
else:
    _load_plugins()

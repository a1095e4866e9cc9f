"""The ``protect`` command line: a thin layer over :mod:`protect.runner` (``run``, ``batch``),
:mod:`protect.t2ue.cli` (``t2ue``) and the commands other packages add (``verify``)."""

from __future__ import annotations

import math
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import torch
import typer
from rich.markup import escape
from rich.table import Table

from protect.config import ConfigError, parse_overrides
from protect.console import RichReporter, err, fail, out, parse_eps, progress_display, resolve_device
from protect.autoset import describe_choices
from protect.generator import available_methods, describe_fields, method_class
from protect.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, OUTPUT_FORMATS
from protect.progress import Reporter
from protect.runner import JobError, JobSummary, UsageError, protect_export, protect_folder
from protect.runner.formats import FORMATS, ColumnOptions
from protect.surrogate_cli import app as surrogate_app
from protect.t2ue.cli import app as t2ue_app

app = typer.Typer(
    help="Make image folders unlearnable: add bounded, imperceptible noise so that models "
    "trained on the copy fail on clean data. Originals are never modified.",
    no_args_is_help=True,
    add_completion=False,
)
# Parameters `run` and `batch` share, declared once.
METHOD_ARGUMENT = typer.Argument(..., help="Noise method; `protect methods` lists them.")
EPS_OPTION = typer.Option(None, "--eps", help="L-inf budget, e.g. 8/255 (default: the method's config).")
CONFIG_OPTION = typer.Option(None, "--config", help="YAML file overriding the method's defaults.")
SET_OPTION = typer.Option([], "--set", help="Override one config key, e.g. --set steps=10 (repeatable).")
SEED_OPTION = typer.Option(0, "--seed", help="Random seed; the same seed and input give the same output.")
DEVICE_OPTION = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto.")
FORMAT_OPTION = typer.Option("png", "--format", help=f"Output format: {', '.join(OUTPUT_FORMATS)}. "
                             "png, tiff and webp are written losslessly.")
LOSSY_OPTION = typer.Option(False, "--allow-lossy", help="Permit a lossy --format (jpeg); it weakens the protection.")
MAX_PIXELS_OPTION = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="Refuse images with more pixels than this "
                                 "(decompression-bomb guard).")
MAX_BYTES_OPTION = typer.Option(DEFAULT_MAX_BYTES, "--max-bytes", help="Refuse files and archive members larger than this "
                                "many bytes.")
ALLOW_OUTSIDE_OPTION = typer.Option(False, "--allow-outside", help="Read files outside the source: links that lead out of "
                                    "a folder, manifest rows outside the manifest's folder (refused by default).")
PROTECTOR_OPTION = typer.Option(None, "--protector", help="Reuse a protector saved with --save-protector: nothing is fitted.")
SAVE_PROTECTOR_OPTION = typer.Option(None, "--save-protector", help="Keep the fitted protector in this folder, to protect "
                                     "later images without fitting (outside the output: it holds the noise).")


def _method_settings(eps: Optional[str], device: str, set_: list[str]) -> tuple[float | None, torch.device, dict]:
    """--eps, --device and --set checked, or a usage error naming the bad value."""
    eps_value = parse_eps(eps)
    torch_device = resolve_device(device)
    try:
        return eps_value, torch_device, parse_overrides(set_)
    except ConfigError as exc:
        raise fail(str(exc)) from None


def _protect(command: str, work: Callable[[Reporter], JobSummary], again: str) -> None:
    """Run a job with progress bars; usage errors exit 2, an interruption says how to finish."""
    with progress_display() as progress:
        try:
            summary = work(RichReporter(progress))
        except UsageError as exc:
            raise fail(str(exc)) from None
        except JobError as exc:
            err.print(f"[red]Error:[/red] {escape(str(exc))}", markup=True, highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print(f"[yellow]Interrupted.[/yellow] {escape(again)}", markup=True, highlight=False)
            raise typer.Exit(130) from None
    _print_summary(command, summary)
    raise typer.Exit(summary.exit_code)


def _print_summary(command: str, summary: JobSummary) -> None:
    """The summary table on stdout, then one line per failed file or record."""
    table = Table(title=f"protect {command} {summary.method}", show_header=False)
    table.add_row("source", f"{escape(str(summary.source))} ({summary.input_format})")
    table.add_row("destination", escape(str(summary.dest)))
    if command == "batch":
        resumed = f" ({summary.units_resumed} done before resume)" if summary.units_resumed else ""
        table.add_row("engine", summary.engine)
        table.add_row("units", f"{summary.units}{resumed}")
    done = f" ({summary.already_done} before the interruption)" if summary.already_done else ""
    table.add_row("images written", f"{summary.written}{done}")
    if summary.copied:
        table.add_row("copied unchanged (not images)", str(summary.copied))
    if summary.not_images:
        table.add_row("skipped (not images)", str(len(summary.not_images)))
    table.add_row("failed", str(len(summary.failed)))
    table.add_row("labels", escape(summary.labels))
    table.add_row("noise fitted", escape(summary.fit))
    if summary.auto_settings:
        shown = describe_choices(method_class(summary.method).auto_settings, summary.auto_settings)
        table.add_row("chosen for these images", escape(shown))
    table.add_row("max |out - in|", f"{summary.max_levels} / 255")
    if summary.mean_psnr is not None:
        table.add_row("mean PSNR", "identical" if math.isinf(summary.mean_psnr) else f"{summary.mean_psnr:.2f} dB")
    if summary.mean_ssim is not None:
        table.add_row("mean SSIM", f"{summary.mean_ssim:.4f} (full resolution)")
    table.add_row("time", f"{summary.seconds:.1f} s (fit {summary.fit_seconds:.1f} s, apply {summary.apply_seconds:.1f} s)")
    out.print(table)
    for name, reason in summary.failed:
        out.print(f"[red]failed:[/red] {escape(name)}: {escape(reason)}", markup=True, highlight=False)
    for problem in summary.problems:
        out.print(f"[red]not protected:[/red] {escape(problem)}", markup=True, highlight=False)


@app.command()
def run(
    method: str = METHOD_ARGUMENT,
    input_dir: Path = typer.Argument(..., help="Folder of images (read recursively, never modified). "
                                     "One subfolder per class gives labels; a flat folder is clustered."),
    output_dir: Path = typer.Argument(..., help="Where the protected copy goes (must be outside INPUT_DIR)."),
    eps: Optional[str] = EPS_OPTION,
    config: Optional[Path] = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
    seed: int = SEED_OPTION,
    device: str = DEVICE_OPTION,
    output_format: str = FORMAT_OPTION,
    allow_lossy: bool = LOSSY_OPTION,
    resume: bool = typer.Option(False, "--resume", help="Finish an interrupted run into the same output folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty output folder, replacing files."),
    max_pixels: int = MAX_PIXELS_OPTION,
    max_bytes: int = MAX_BYTES_OPTION,
    allow_outside: bool = ALLOW_OUTSIDE_OPTION,
    protector: Optional[Path] = PROTECTOR_OPTION,
    save_protector: Optional[Path] = SAVE_PROTECTOR_OPTION,
    captions: Optional[Path] = typer.Option(None, "--captions", help="For text-driven methods (t2ue): a .csv/.jsonl of "
                                            "image (path relative to INPUT_DIR), caption. Same as --set captions=FILE."),
) -> None:
    """Write a protected copy of INPUT_DIR to OUTPUT_DIR, fitting the noise on all its images.

    Exit code: 0 every image written, 1 some files failed (listed), 2 usage error.
    """
    eps_value, torch_device, overrides = _method_settings(eps, device, set_)
    if captions is not None:
        overrides["captions"] = str(captions)
    _protect(
        "run",
        lambda reporter: protect_folder(
            method, input_dir, output_dir, eps=eps_value, config_file=config, overrides=overrides,
            seed=seed, device=torch_device, output_format=output_format, allow_lossy=allow_lossy,
            resume=resume, overwrite=overwrite, max_pixels=max_pixels, max_bytes=max_bytes, allow_outside=allow_outside,
            reporter=reporter,
            protector=protector, save_protector_to=save_protector,
        ),
        f"Files written so far are complete; run the same command with --resume to finish into {output_dir}.",
    )


@app.command()
def batch(
    method: str = METHOD_ARGUMENT,
    source: Path = typer.Argument(..., help="The export: an image folder, a .csv/.jsonl manifest, .tar shards, "
                                  ".parquet files or a .zip (a file, or a folder of them). Never modified."),
    dest: Path = typer.Argument(..., help="Folder for the protected export, in the same format."),
    input_format: str = typer.Option("auto", "--input-format", help=f"auto, {', '.join(FORMATS)}."),
    image_column: str = typer.Option("image", "--image-column", help="Manifest/Parquet column holding the image (path or bytes)."),
    label_column: str = typer.Option("label", "--label-column", help="Manifest/Parquet column holding the label."),
    caption_column: str = typer.Option("caption", "--caption-column", help="Manifest/Parquet column holding the caption."),
    eps: Optional[str] = EPS_OPTION,
    config: Optional[Path] = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
    seed: int = SEED_OPTION,
    device: str = DEVICE_OPTION,
    output_format: str = FORMAT_OPTION,
    allow_lossy: bool = LOSSY_OPTION,
    engine: str = typer.Option("local", "--engine", help="local (processes on this machine) or ray (Ray Data)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: a local Ray instance)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Parallel workers (default: up to 4, one per core)."),
    unit_size: int = typer.Option(256, "--unit-size", help="Records per unit: the grain of parallelism, resume and sample-wise fits."),
    fit_sample: int = typer.Option(5000, "--fit-sample", help="Images sampled to fit once for the whole export (class-wise "
                                   "noise, cluster protectors)."),
    fit_devices: Optional[str] = typer.Option(None, "--fit-devices", help="Fit once data-parallel, one process per device, "
                                              "e.g. cuda:0,cuda:1 (torch.distributed; error-minimising methods)."),
    protector: Optional[Path] = PROTECTOR_OPTION,
    save_protector: Optional[Path] = SAVE_PROTECTOR_OPTION,
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty DEST, or restart an unfinished job."),
    max_pixels: int = MAX_PIXELS_OPTION,
    max_bytes: int = MAX_BYTES_OPTION,
    allow_outside: bool = ALLOW_OUTSIDE_OPTION,
) -> None:
    """Protect a whole dataset export from SOURCE into DEST, same format, streaming and resumable.

    Rerun the same command after an interruption to finish the job. Exit code: 0 every record
    done, 1 some records failed (listed), 2 usage error.
    """
    eps_value, torch_device, overrides = _method_settings(eps, device, set_)
    columns = ColumnOptions(image=image_column, label=label_column or None, caption=caption_column or None)
    _protect(
        "batch",
        lambda reporter: protect_export(
            method, source, dest, input_format=input_format, columns=columns, eps=eps_value, config_file=config,
            overrides=overrides, seed=seed, device=torch_device, output_format=output_format, allow_lossy=allow_lossy,
            engine=engine, workers=workers, address=address, unit_size=unit_size, fit_sample=fit_sample,
            fit_devices=fit_devices.split(",") if fit_devices else None, protector=protector,
            save_protector_to=save_protector, overwrite=overwrite, max_pixels=max_pixels, max_bytes=max_bytes,
            allow_outside=allow_outside, reporter=reporter,
        ),
        f"Finished units are kept; run the same command again to finish into {dest}.",
    )


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
            for setting in cls.auto_settings:
                table.add_row("", "", "[dim]" + escape(f"{setting.key}: chosen from the folder unless set: {setting.rule}") + "[/dim]")
    out.print(table)


app.add_typer(t2ue_app, name="t2ue")
app.add_typer(surrogate_app, name="surrogate")


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

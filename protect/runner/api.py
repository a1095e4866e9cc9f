"""The Python API: :func:`protect_folder` (``protect run``) and :func:`protect_export`
(``protect batch``), two front-ends of one :class:`~protect.runner.job.Job`.

Both write a protected copy (PNG by default), each image within ``round(eps*255)`` levels of
its original in every channel, plus ``manifest.jsonl`` (one line per protected image: input and
output names, their SHA-256, label, size) and ``protection.json`` (method, resolved config,
seed, hardware, package versions, summary). Originals are only ever read; every output file is
written atomically; per-file problems are listed and the job goes on. They differ in the fit:
``protect_folder`` fits once on every image of the folder (what the paper setting measures),
``protect_export`` fits once on a sample when the method's fit covers new images and otherwise
unit by unit, so exports of any size stream in bounded memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from protect.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from protect.progress import Reporter
from protect.runner.formats import ColumnOptions
from protect.runner.job import Job, JobSummary, run_job


def protect_folder(
    method: str,
    input_dir: Path | str,
    output_dir: Path | str,
    *,
    eps: float | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    output_format: str = "png",
    allow_lossy: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_outside: bool = False,
    reporter: Reporter | None = None,
    protector: Path | str | None = None,
    save_protector_to: Path | str | None = None,
    unit_size: int = 256,
) -> JobSummary:
    """Write a protected copy of the image folder ``input_dir`` into ``output_dir`` with ``method``.

    The copy mirrors the tree; files that are not images are skipped and listed. One subfolder
    per class gives labels; a method that needs labels clusters an unlabelled folder into
    pseudo-classes. The noise is fitted once on every readable image, with ``seed``. Raises
    :class:`~protect.runner.job.UsageError` before writing anything when the request itself is
    wrong; per-file problems are reported in the returned summary instead.

    ``resume``: finish an interrupted run into the same ``output_dir`` (same settings);
    ``overwrite``: replace the files this run writes in a non-empty ``output_dir``.
    ``protector``: a folder written by ``save_protector_to`` (or ``protect batch``): its fitted
    state is loaded and nothing is fitted. ``save_protector_to``: keep the fitted state there
    (outside both folders: it holds the noise) for methods whose fit protects later images
    (class-wise noise on labelled folders, ``clusters``, ``t2ue``). ``unit_size``: images
    written between two journal entries (the grain of ``resume``).

    What is read (docs/security.md): regular files of at most ``max_bytes`` bytes and
    ``max_pixels`` pixels, inside ``input_dir``; links that lead out of it are refused (each
    named, exit code 1) unless ``allow_outside``.
    """
    job = Job(
        method, Path(input_dir), Path(output_dir), input_format="imagefolder", eps=eps, config_file=config_file,
        overrides=overrides, seed=seed, device=device, output_format=output_format, allow_lossy=allow_lossy,
        workers=1, unit_size=unit_size, protector=protector, save_protector_to=save_protector_to, overwrite=overwrite,
        resume=resume, max_pixels=max_pixels, max_bytes=max_bytes, allow_outside=allow_outside, fit_whole=True,
        keep_other_files=False, threads=None,
    )
    return run_job(job, reporter)


def protect_export(
    method: str,
    source: Path | str,
    dest: Path | str,
    *,
    input_format: str = "auto",
    columns: ColumnOptions | None = None,
    eps: float | None = None,
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    output_format: str = "png",
    allow_lossy: bool = False,
    engine: str = "local",
    workers: int | None = None,
    address: str | None = None,
    unit_size: int = 256,
    fit_sample: int = 5000,
    fit_devices: list[str] | None = None,
    protector: Path | str | None = None,
    save_protector_to: Path | str | None = None,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_outside: bool = False,
    reporter: Reporter | None = None,
) -> JobSummary:
    """Write a protected copy of the export ``source`` (an image folder, CSV/JSONL manifest,
    tar shards, Parquet files or a zip; a file or a folder of them) into the folder ``dest``,
    in the same format, with every non-image field, file and the record order kept.

    Records stream in units of ``unit_size`` on ``engine`` (``local`` processes or ``ray``)
    with ``workers`` in parallel. A method whose fit covers new images is fitted once on up to
    ``fit_sample`` images spread over the export (data-parallel on ``fit_devices``, one
    process each, see :mod:`protect.distributed`); sample-wise methods fit unit by unit.
    Raises :class:`~protect.runner.job.UsageError` before writing anything when the request is
    wrong; records that cannot be protected are left out of the output and listed in the
    summary. Rerunning the same call after an interruption finishes the job
    (``dest/.protect-state`` holds its state).

    What is read (docs/security.md): regular files and archive members of at most
    ``max_bytes`` bytes and ``max_pixels`` pixels, inside ``source`` (for a manifest: inside its
    folder) unless ``allow_outside``; ``dest`` may hold no file the job reads.
    """
    job = Job(
        method, Path(source), Path(dest), input_format=input_format, columns=columns or ColumnOptions(), eps=eps,
        config_file=config_file, overrides=overrides, seed=seed, device=device, output_format=output_format,
        allow_lossy=allow_lossy, engine=engine, workers=workers, address=address, unit_size=unit_size,
        fit_sample=fit_sample, fit_devices=fit_devices, protector=protector, save_protector_to=save_protector_to,
        overwrite=overwrite, resume=None, max_pixels=max_pixels, max_bytes=max_bytes, allow_outside=allow_outside,
        fit_whole=False, keep_other_files=True, threads=1,
    )
    return run_job(job, reporter)

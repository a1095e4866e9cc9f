"""One job: write a protected copy of a source (an image folder or a dataset export) into DEST.

``protect run`` and ``protect batch`` are both this job; they differ only in how the noise is
fitted (:attr:`Job.fit_whole`) and in a few defaults (see :mod:`protect.runner.api`).

Phases:

1. *plan*: check the request (usage errors, before anything is written), list the source's
   records as units (contiguous slices in source order).
2. *fit*, one of:

   - the whole source at once with the job's seed (``fit_whole``: ``protect run``);
   - a protector saved earlier (``protector=``): nothing is fitted;
   - once for the job, on a sample spread over every unit, when the method's fit covers new
     images (:class:`~protect.generator.FitScope`: one noise per class, a cluster protector, a
     text-to-noise generator);
   - otherwise unit by unit, inside each unit, with a seed fixed by the unit's position.

   A fit made for the job is kept in the state folder before anything is applied.
3. *apply*: units are protected on the engine, streaming; each finished unit is journalled.
4. *join*: the parts of each output file are joined in order, atomically.
5. *finish*: ``manifest.jsonl`` (one line per protected image) and ``protection.json`` (how the
   copy was made), then the state folder is deleted: it holds the noise itself.

While a job is unfinished, ``DEST/.protect-state/`` holds its journal, the parts and the fit;
the same job run again (``--resume`` for ``protect run``) skips what the journal lists and
writes the same bytes as an uninterrupted job. A job that stops after writing (interrupted, out
of memory, disk full) leaves DEST consistent: ``manifest.jsonl`` lists what was written, and
the state is kept for the rerun, which the message says.

The policy on hostile input (what is read, written, refused, reported, and the resource caps)
is docs/security.md.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from safetensors.torch import load_file

from protect.autoset import user_keys
from protect.config import ConfigError
from protect.distributed import DistributedFitError, check_devices, fit_data_parallel
from protect.generator import FitScope, Generator, method_class
from protect.hardware import device_description, package_versions
from protect.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, OUTPUT_FORMATS, write_text_atomic
from protect.metrics import METHOD_NOTE
from protect.precision import resolved_precision
from protect.progress import NullReporter, Reporter
from protect.protector import (
    PROTECTOR_META,
    PROTECTOR_TENSORS,
    read_protector_meta,
    read_protector_tensors,
    resolve_with_protector,
    save_protector,
)
from protect.runner.auto import AutoRecord, fit_choices, peeked_side, report_choices, size_choices, wants_size
from protect.runner.engines import ENGINES, EngineError, default_workers, run_units
from protect.runner.formats import ColumnOptions, ExportFormat, FormatError, Unit, detect_format, remove_stale_temporaries
from protect.runner.journal import Journal, JournalState
from protect.runner.labels import FitLabels, label_tensor, labels_for_fit, source_classes
from protect.runner.unit import JobSpec, decoded_records, new_generator, remember_protector
from protect.scale import working_tensor
from protect.training_state import CheckpointError

STATE_DIR_NAME = ".protect-state"
MANIFEST_NAME = "manifest.jsonl"
PROTECTION_NAME = "protection.json"


class UsageError(ValueError):
    """The job cannot start as asked (paths, options, config); nothing was written."""


class JobError(RuntimeError):
    """The job stopped after it started writing; the message says what is kept and how to finish."""


class FileFailure(NamedTuple):
    """A file or record that could not be protected: its name and why."""

    path: str
    reason: str


@dataclass
class Job:
    """A request to protect ``source`` into ``dest`` with ``method``.

    ``fit_whole``: fit once on every image of the source with the job's seed (otherwise: once
    on a sample when the fit covers new images, else unit by unit). ``resume``: True finishes an
    unfinished job in ``dest`` (and refuses a ``dest`` that holds none); False refuses one;
    None (``protect batch``) finishes one when the settings match. ``keep_other_files``: copy a
    folder's non-image files into ``dest`` (else they are skipped and listed). ``threads``:
    torch threads per unit (1: the same bytes on every engine; None: the process's setting).
    """

    method: str
    source: Path
    dest: Path
    input_format: str = "auto"
    columns: ColumnOptions = field(default_factory=ColumnOptions)
    eps: float | None = None
    config_file: Path | None = None
    overrides: dict[str, Any] | None = None
    seed: int = 0
    device: str | torch.device = "cpu"
    output_format: str = "png"
    allow_lossy: bool = False
    engine: str = "local"
    workers: int | None = None
    address: str | None = None
    unit_size: int = 256
    fit_sample: int = 5000
    fit_devices: list[str] | None = None
    protector: Path | str | None = None
    save_protector_to: Path | str | None = None
    overwrite: bool = False
    resume: bool | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    allow_outside: bool = False
    fit_whole: bool = False
    keep_other_files: bool = True
    threads: int | None = 1


@dataclass
class JobSummary:
    """What a job did. ``exit_code`` is 0 when every record was done, 1 when some failed.

    ``written`` counts every image protected by the job, ``already_done`` those of them done
    before an interruption; ``copied`` counts records without an image passed through
    unchanged, ``not_images`` the files skipped; ``problems`` are faults of the whole copy
    (e.g. no pixel changed), which make the exit code 1 like failed files."""

    method: str
    source: Path
    dest: Path
    input_format: str
    engine: str
    units: int = 0
    units_resumed: int = 0
    written: int = 0
    already_done: int = 0
    copied: int = 0
    failed: list[FileFailure] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    max_levels: int = 0
    mean_psnr: float | None = None
    mean_ssim: float | None = None
    labels: str = "none"
    fit: str = ""
    #: settings chosen from the folder: {key: {"value", "default", "rule", "from"}}
    auto_settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    fit_seconds: float = 0.0
    apply_seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.problems else 0


@dataclass
class _Fit:
    """The outcome of the fit phase: the job as units see it, and what to record about it."""

    spec: JobSpec
    description: str
    labels: str = "none"
    info: dict[str, Any] = field(default_factory=dict)


def run_job(job: Job, reporter: Reporter | None = None) -> JobSummary:
    """Run ``job``; raises :class:`UsageError` before writing anything when the request is
    wrong. Records that cannot be protected are left out of the output and listed in the summary."""
    started = time.perf_counter()
    reporter = reporter or NullReporter()
    source, dest = Path(job.source), Path(job.dest)
    workers = job.workers or default_workers()
    _check_options(job, workers)
    _check_limits(job)
    _check_fit_devices(job)
    check_paths(source, dest, job.save_protector_to)
    try:
        input_format = detect_format(source) if job.input_format == "auto" else job.input_format
        config, reused = resolve_with_protector(job.method, job.eps, job.config_file, job.overrides, job.protector)
    except (ConfigError, FormatError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    scope = method_class(job.method).fit_scope
    if job.save_protector_to is not None and reused is None and scope is FitScope.FITTED_IMAGES:
        raise UsageError(_cannot_save_protector(job.method, source))

    spec = JobSpec(
        format=input_format, source=str(source), dest=str(dest), parts_dir=str(dest / STATE_DIR_NAME / "parts"),
        columns=job.columns, method=job.method, config=config, seed=job.seed, device=str(job.device),
        image_format=job.output_format, max_pixels=job.max_pixels, max_bytes=job.max_bytes,
        allow_outside=job.allow_outside, keep_other_files=job.keep_other_files, threads=job.threads,
        fixed_keys=tuple(sorted(user_keys(job.config_file, job.overrides, job.eps))),
    )
    try:
        # Built here so that what the method cannot start with (missing weights, a damaged
        # protector) is a usage error, before anything is written.
        generator = new_generator(spec, job.seed)
        if reused is not None:
            _load_protector(generator, Path(job.protector))
        fmt = spec.open_format()
        units = list(fmt.units(job.unit_size))
        _check_dest_reads_nothing(fmt, dest)
    except (ConfigError, FormatError) as exc:
        raise UsageError(str(exc)) from None
    if not units:
        raise UsageError(fmt.nothing_found())
    created = not dest.exists()
    with _output_lock(dest):
        return _run_locked(job, spec, generator, fmt, units, config, reused, workers, started, created, reporter)


def _run_locked(
    job: Job, spec: JobSpec, generator: Generator, fmt: ExportFormat, units: list[Unit], config: dict[str, Any],
    reused: dict[str, Any] | None, workers: int, started: float, created: bool, reporter: Reporter,
) -> JobSummary:
    source, dest, input_format = Path(job.source), Path(job.dest), spec.format

    state_dir = dest / STATE_DIR_NAME
    journal = Journal(state_dir / "journal.jsonl")
    settings = {
        "method": job.method, "config": config, "seed": job.seed, "format": input_format, "source": str(source.resolve()),
        "columns": asdict(job.columns), "image_format": job.output_format, "unit_size": job.unit_size,
        "fit": "whole" if job.fit_whole else "shared", "fit_sample": job.fit_sample, "keep_other_files": job.keep_other_files,
        "protector": reused.get("digest") if reused else None, "max_pixels": job.max_pixels, "max_bytes": job.max_bytes,
        "allow_outside": job.allow_outside,
    }
    done = _open_journal(journal, settings, dest, job, reporter)
    if not OUTPUT_FORMATS[job.output_format][2]:
        reporter.message(f"writing lossy {job.output_format}: re-encoding changes the noise and weakens the protection", "warning")
    summary = JobSummary(job.method, source, dest, input_format, job.engine, units=len(units))
    summary.not_images = fmt.skipped()
    for path in summary.not_images:
        reporter.message(f"{path}: skipped, not an image file", "info")
    summary.already_done = sum(r["written"] for r in done.units.values())
    if done.complete:
        return _finish(summary, journal.read(), state_dir, settings, str(job.device), started)
    removed = remove_stale_temporaries(dest)
    if removed:
        reporter.message(f"removed {removed} unfinished temporary file(s) left by the interrupted run", "info")
    Path(spec.parts_dir).mkdir(parents=True, exist_ok=True)

    fit_started = time.perf_counter()
    chosen: AutoRecord = {}
    try:
        if reused is None:
            spec, generator, chosen = _choose_from_size(spec, generator, fmt, units, reporter)
        fit = _fit_phase(spec, job, generator, units, fmt, state_dir, reused, reporter)
    except UsageError:
        if done.header is not None and not done.units and not done.fit:  # started by this call: leave nothing behind
            _forget_unstarted_job(dest, created)
        raise
    summary.fit_seconds = time.perf_counter() - fit_started if fit.info.get("fitted_now") else 0.0
    summary.fit, summary.labels = fit.description, fit.labels
    fit_record = {"how": fit.description, "labels": fit.labels,
                  **{k: v for k, v in fit.info.items() if k not in ("fitted_now", "auto_settings")},
                  "config": fit.spec.config, "auto_settings": {**chosen, **fit.info.get("auto_settings", {})}}
    journal.fitted(fit_record)
    try:
        _apply_phase(job, fit, fmt, units, done, journal, workers, summary, reporter)
    except BaseException as exc:
        note = _keep_progress(journal, dest, len(units), job)
        if isinstance(exc, (KeyboardInterrupt, UsageError)):
            reporter.message(note, "warning")
            raise
        raise JobError(f"the job stopped: {type(exc).__name__}: {exc}. {note}") from exc
    summary = _finish(summary, journal.read(), state_dir, settings, str(job.device), started)
    if summary.failed:
        reporter.message(
            f"{len(summary.failed)} file(s) failed; fix or remove them and rerun with --overwrite to protect them too", "warning"
        )
    for problem in summary.problems:
        reporter.message(problem, "error")
    return summary


def _apply_phase(
    job: Job, fit: _Fit, fmt: ExportFormat, units: list[Unit], done: JournalState, journal: Journal, workers: int,
    summary: JobSummary, reporter: Reporter,
) -> None:
    """Protect the units not done yet, on the engine, and join the parts."""
    apply_started = time.perf_counter()
    pending = [u for u in units if u.index not in done.units]
    summary.units_resumed = len(units) - len(pending)
    if summary.units_resumed:
        reporter.message(f"resuming: {summary.units_resumed} of {len(units)} units already done", "info")
    label = f"protecting with {job.method}" + ("" if job.fit_whole else f" ({job.engine})")
    with reporter.phase(label, total=sum(u.count for u in units)) as phase:
        phase.advance(sum(u.count for u in units if u.index in done.units))

        def on_result(result: dict[str, Any]) -> None:
            journal.unit_done(result)
            for key, note in result["notes"]:
                reporter.message(f"{key}: {note}", "info")
            for key, reason in result["failed"]:
                reporter.message(f"{key}: {reason}", "error")
            phase.advance(result["records"])

        try:
            run_units(job.engine, fit.spec, pending, on_result, workers=workers, address=job.address)
        except EngineError as exc:
            raise UsageError(str(exc)) from None
    summary.apply_seconds = time.perf_counter() - apply_started
    _join_outputs(fit.spec, fmt, units, journal, reporter)
    journal.completed()


def _forget_unstarted_job(dest: Path, created: bool) -> None:
    """A job refused in its fit phase, before any unit was written, leaves nothing behind."""
    shutil.rmtree(dest / STATE_DIR_NAME, ignore_errors=True)
    if created and dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()


def _keep_progress(journal: Journal, dest: Path, total: int, job: Job) -> str:
    """After a stop: list what is written in the manifest, and say what is kept and how to finish."""
    results = [unit for _, unit in sorted(journal.read().units.items())]
    try:
        write_text_atomic(dest / MANIFEST_NAME, _manifest_text(results))
    except OSError:
        pass  # the disk that stopped the job may refuse this too; the journal still has it
    again = "run the same command with --resume" if job.fit_whole else "run the same command again"
    return (
        f"{len(results)} of {total} units are written and listed in {dest / MANIFEST_NAME}; the fitted noise is kept in "
        f"{dest / STATE_DIR_NAME} to finish the job: {again} (or delete that folder: it holds the noise)"
    )


# ----------------------------------------------------------------------------------------------
# checks before anything is written


def _check_options(job: Job, workers: int) -> None:
    if job.engine not in ENGINES:
        raise UsageError(f"unknown engine {job.engine!r}; choose one of {', '.join(ENGINES)}")
    if job.output_format not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format {job.output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if not OUTPUT_FORMATS[job.output_format][2] and not job.allow_lossy:
        raise UsageError(
            f"{job.output_format} is lossy: re-encoding weakens or removes the protection. "
            "Pass --allow-lossy to write it anyway, or use png (default), tiff or webp (lossless)."
        )
    if job.unit_size < 1 or job.fit_sample < 1 or workers < 1:
        raise UsageError("--unit-size, --fit-sample and --workers must be at least 1")
    if job.resume and job.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")


def _check_fit_devices(job: Job) -> None:
    if not job.fit_devices:
        return
    try:
        cls = method_class(job.method)
        check_devices(job.fit_devices)
    except (ConfigError, DistributedFitError) as exc:
        raise UsageError(f"--fit-devices: {exc}") from None
    if job.protector is not None:
        why = "reuses the saved protector, with no fit"
    elif job.fit_whole:
        why = "fits the whole folder in this process"
    elif cls.fit_scope is FitScope.FITTED_IMAGES:
        why = "fits per unit"
    elif not cls.data_parallel_fit:
        why = "fits on one device"
    else:
        return
    raise UsageError(f"--fit-devices is for methods fitted once for the whole export on several devices; {job.method} {why}")


def _check_limits(job: Job) -> None:
    if job.max_pixels < 1 or job.max_bytes < 1:
        raise UsageError(f"--max-pixels and --max-bytes must be at least 1; got {job.max_pixels} and {job.max_bytes}")


def _check_dest_reads_nothing(fmt: ExportFormat, dest: Path) -> None:
    """Refuse a DEST that holds a file the job reads: writing there could replace an original."""
    out = Path(os.path.realpath(dest))
    for path in fmt.files_read():
        real = Path(os.path.realpath(path))
        if real == out or real.is_relative_to(out):
            raise UsageError(
                f"output folder {dest} holds {path}, which the job reads: writing there could replace an original; "
                "choose an output folder outside the data"
            )


@contextmanager
def _output_lock(dest: Path) -> Iterator[None]:
    """An exclusive lock on DEST while the job runs: a second job writing there is refused."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        handle = os.open(dest, os.O_RDONLY)
    except OSError as exc:
        raise UsageError(f"cannot write into {dest}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another protect job is writing into {dest}; wait for it to finish, or stop it") from None
        yield
    finally:
        os.close(handle)  # releases the lock


def _load_protector(generator: Generator, folder: Path) -> None:
    try:
        generator.load_state_dict(read_protector_tensors(folder))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{folder / PROTECTOR_TENSORS}: these tensors are not a {generator.name} protector ({exc})") from None


def check_paths(source: Path, dest: Path, save_protector_to: Path | str | None) -> None:
    """Refuse anything that could write into the source or publish the noise inside DEST."""
    if not source.exists():
        raise UsageError(f"source not found: {source}")
    src, out = source.resolve(), dest.resolve()
    if src.is_dir() and out.is_relative_to(src):
        raise UsageError(f"output folder {dest} is inside the input folder {source}; choose one outside it")
    if src.is_file() and out == src.parent:
        raise UsageError(f"output folder {dest} is the folder of the source {source}: outputs would replace it; choose another")
    if src.is_relative_to(out):
        raise UsageError(f"input {source} is inside the output folder {dest}; choose another output")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"output path exists and is not a folder: {dest}")
    if save_protector_to is None:
        return
    target = Path(save_protector_to).resolve()
    for name, where in (("output", out), ("input", src)):
        if target == where or target.is_relative_to(where):
            raise UsageError(
                f"--save-protector {save_protector_to} is inside the {name} folder {where}: the protector holds the noise, and "
                "whoever has it can remove the protection; keep it somewhere private"
            )


def _cannot_save_protector(method: str, source: Path) -> str:
    return (
        f"{method} cannot save a protector for {source}: its noise belongs to the images it was fitted on; protectors "
        "are kept for class-wise methods on labelled sources and for methods whose fit covers any image (clusters, t2ue)"
    )


def _open_journal(journal: Journal, settings: dict[str, Any], dest: Path, job: Job, reporter: Reporter) -> JournalState:
    """The journal of an unfinished job with the same settings (when resuming), or a fresh one."""
    state = journal.read()
    if state.header is not None and not job.overwrite:
        if job.resume is False:
            raise UsageError(
                f"output folder {dest} is not empty: it holds an unfinished run; pass --resume to finish it, "
                "or --overwrite to start again"
            )
        if state.header != settings:
            changed = sorted(k for k in settings if state.header.get(k) != settings[k])
            raise UsageError(
                f"{dest} holds an unfinished job with other settings ({', '.join(changed)}); rerun it with the "
                "same settings to finish it, or pass --overwrite to start again"
            )
        return state
    occupied = dest.exists() and any(p.name != STATE_DIR_NAME for p in dest.iterdir())
    if occupied and not job.overwrite:
        if job.resume:
            raise UsageError(
                f"nothing to resume in {dest}: it holds no unfinished run (the run finished, or the folder holds other "
                "files); pass --overwrite to replace the files this run writes"
            )
        if job.resume is None:
            raise UsageError(f"output folder {dest} is not empty: pass --overwrite to replace the files this job writes")
        raise UsageError(
            f"output folder {dest} is not empty: pass --resume to finish an interrupted run, "
            "or --overwrite to replace the files this run writes"
        )
    if journal.path.parent.exists():
        shutil.rmtree(journal.path.parent)
    try:
        journal.start(settings)
    except OSError as exc:
        raise UsageError(f"cannot write into {dest}: {exc.strerror or exc}") from None
    return JournalState(header=settings)


# ----------------------------------------------------------------------------------------------
# the fit


def _choose_from_size(
    spec: JobSpec, generator: Generator, fmt: ExportFormat, units: list[Unit], reporter: Reporter
) -> tuple[JobSpec, Generator, AutoRecord]:
    """The settings the method chooses from the images' size (the working resolution), from the
    first readable images of the source."""
    if not wants_size(generator, spec.fixed_keys):
        return spec, generator, {}
    readable = (image for unit in units for _, image, problem in decoded_records(fmt.read(unit), spec)
                if image is not None and problem is None)
    side = peeked_side(readable)
    config, chosen = size_choices(generator, spec.config, spec.fixed_keys, side)
    spec = _with(spec, config=config, image_side=side)
    if chosen:
        generator = new_generator(spec, generator.seed)
        report_choices(generator, chosen, reporter)
    return spec, generator, chosen


def _choose_for_fit(
    spec: JobSpec, generator: Generator, images: int, labels: FitLabels | None, reporter: Reporter
) -> tuple[JobSpec, Generator, AutoRecord]:
    """The settings the method chooses from its fit set (``images`` images, ``labels``), and
    the generator made with them."""
    config, chosen = fit_choices(generator, spec.config, spec.fixed_keys, images, labels, spec.image_side)
    if not chosen:
        return spec, generator, {}
    spec = _with(spec, config=config)
    generator = new_generator(spec, generator.seed)
    report_choices(generator, chosen, reporter)
    return spec, generator, chosen


def _fit_phase(
    spec: JobSpec, job: Job, generator: Generator, units: list[Unit], fmt: ExportFormat, state_dir: Path,
    reused: dict[str, Any] | None, reporter: Reporter,
) -> _Fit:
    """The job as units see it: with its fit attached (made once), or unchanged (fitted per unit).
    ``generator`` is a fresh one with the job's seed, for a fit made once."""
    if reused is not None:
        classes = reused.get("classes") or []
        reporter.message(f"reusing the {job.method} protector saved in {job.protector}: nothing is fitted", "info")
        spec = _with(spec, protector=str(job.protector), classes=tuple(classes))
        remember_protector(spec, generator)  # loaded and checked when the job was planned
        return _Fit(
            spec, f"saved protector ({job.protector})",
            f"protector classes ({len(classes)})" if classes else "none",
            {"protector_sha256": reused["digest"], "protector_fitted_on": reused.get("fitted_on")},
        )
    if job.fit_whole:
        return _fit_whole(spec, job, generator, units, fmt, state_dir, reporter)
    if method_class(job.method).fit_scope is FitScope.FITTED_IMAGES:
        return _Fit(spec, "per unit (sample-wise noise)", "per unit")
    return _fit_shared(spec, job, generator, units, fmt, state_dir, reporter)


def _with(spec: JobSpec, **changes: Any) -> JobSpec:
    return JobSpec(**{**spec.__dict__, **changes})


def _kept_protector(state_dir: Path) -> Path:
    return state_dir / "protector"


def _restore(spec: JobSpec, kept: Path, reporter: Reporter) -> tuple[JobSpec, Generator, dict[str, Any]]:
    """The job's spec and generator with the config and state of the fit kept in ``kept``."""
    meta = read_protector_meta(kept)
    spec = _with(spec, config=meta["config"])
    generator = new_generator(spec, spec.seed)
    generator.load_state_dict(load_file(str(kept / PROTECTOR_TENSORS)))
    reporter.message(f"resuming: the fitted {spec.method} restored from the interrupted run", "info")
    return spec, generator, meta


def _copy_protector(kept: Path, save_to: Path | str | None, reporter: Reporter) -> None:
    if save_to is None:
        return
    target = Path(save_to)
    target.mkdir(parents=True, exist_ok=True)
    for name in (PROTECTOR_TENSORS, PROTECTOR_META):
        shutil.copyfile(kept / name, target / name)
    reporter.message(f"protector saved to {save_to}; it holds the noise, keep it private", "warning")


def _label_report(generator: Generator, labels: torch.Tensor, reporter: Reporter) -> dict[str, Any]:
    """The fit measured against the source's labels (cluster purity and NMI for clusters), printed and recorded."""
    report = generator.label_report(labels)
    quality = report.get("cluster_quality")
    if quality:
        reporter.message(f"{generator.name}: clusters against the folder labels: purity {quality['purity']:.3f}, "
                         f"NMI {quality['nmi']:.3f} (labels read for this report only)")
    return report


def _fit_whole(
    spec: JobSpec, job: Job, generator: Generator, units: list[Unit], fmt: ExportFormat, state_dir: Path, reporter: Reporter
) -> _Fit:
    """Fit once on every readable image of the source, with the job's seed (``protect run``).
    The fit and the list of its images (rows, hashes, labels) are kept in the state folder."""
    kept, index_path = _kept_protector(state_dir), state_dir / "fit-index.json"
    spec = _with(spec, protector=str(kept), fit_index=str(index_path))
    if (kept / PROTECTOR_META).exists() and index_path.exists():
        spec, generator, meta = _restore(spec, kept, reporter)
        remember_protector(spec, generator)
        info = {**meta["fit"], "auto_settings": meta.get("auto_settings", {})}
        return _Fit(_with(spec, classes=tuple(meta["classes"])), meta["how"], meta["label_source"], info)
    names, digests, labels, small = [], [], [], []
    with reporter.phase("reading images", total=sum(u.count for u in units)) as phase:
        for unit in units:
            for record, image, problem in decoded_records(fmt.read(unit), spec):
                if image is not None and problem is None:
                    names.append(record.name)
                    digests.append(image.sha256)
                    labels.append(record.label)
                    small.append(working_tensor(image, generator.config.resolution))
                phase.advance()
    how = f"once, on all {len(small)} readable images"
    if not small:  # every record fails when it is read again; nothing to fit
        remember_protector(spec, generator)
        index_path.write_text(json.dumps({"rows": {}, "labels": None, "pseudo": False}), encoding="utf-8")
        return _Fit(spec, how)
    images = torch.stack(small)
    fit_labels = labels_for_fit(labels, images, generator, origin=fmt.label_origin, reporter=reporter, where=str(job.source))
    covers_new = generator.fit_scope.covers_new_images(bool(fit_labels.classes))
    if job.save_protector_to is not None and not covers_new:
        raise UsageError(_cannot_save_protector(job.method, Path(job.source)))
    spec, generator, chosen = _choose_for_fit(spec, generator, len(small), fit_labels, reporter)
    # A long fit keeps its progress here after each step, so --resume continues an interrupted fit.
    generator.fit_checkpoint_dir = state_dir / "fit-progress"
    try:
        generator.fit(images, fit_labels.labels, reporter)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    info = {**generator.fit_summary(), "fitted_now": True}
    if fit_labels.labels is not None and not fit_labels.pseudo:
        info.update(_label_report(generator, fit_labels.labels, reporter))
    classes = fit_labels.classes if generator.fit_scope is FitScope.CLASSES else []
    meta = {"method": job.method, "config": spec.config, "seed": spec.seed, "classes": classes, "fitted_on": len(small),
            "fit": {k: v for k, v in info.items() if k != "fitted_now"}, "how": how, "label_source": fit_labels.source,
            "auto_settings": chosen}
    info["auto_settings"] = chosen
    save_protector(kept, generator, meta)
    shutil.rmtree(state_dir / "fit-progress", ignore_errors=True)  # the kept fit replaces it
    rows = {name: [row, digest] for row, (name, digest) in enumerate(zip(names, digests))}
    index = {"rows": rows, "labels": None if fit_labels.labels is None else fit_labels.labels.tolist(), "pseudo": fit_labels.pseudo}
    write_text_atomic(index_path, json.dumps(index))
    remember_protector(spec, generator)
    _copy_protector(kept, job.save_protector_to, reporter)
    return _Fit(_with(spec, classes=tuple(classes)), how, fit_labels.source, info)


def _fit_shared(
    spec: JobSpec, job: Job, generator: Generator, units: list[Unit], fmt: ExportFormat, state_dir: Path, reporter: Reporter
) -> _Fit:
    """Fit once for the job, on a sample (methods whose fit covers new images), or fall back
    to per-unit fits when class noise finds no labels to fit on."""
    kept = _kept_protector(state_dir)
    if (kept / PROTECTOR_META).exists():
        spec, generator, meta = _restore(spec, kept, reporter)
        info: dict[str, Any] = meta["fit"]
    else:
        fitted = _fit_protector(spec, job, generator, units, kept, reporter)
        if fitted is None:
            if job.save_protector_to is not None:
                raise UsageError(_cannot_save_protector(job.method, Path(job.source)))
            return _Fit(spec, "per unit (the source has no labels with two classes or more to fit class noise on)", "per unit")
        spec, generator, meta = fitted
        info = {**meta["fit"], "fitted_now": True}
    info["auto_settings"] = meta.get("auto_settings", {})
    spec = _with(spec, protector=str(kept), classes=tuple(meta["classes"]))
    remember_protector(spec, generator)
    _copy_protector(kept, job.save_protector_to, reporter)
    labels = f"{fmt.label_origin} ({len(meta['classes'])} classes)" if meta["classes"] else "none"
    return _Fit(spec, f"once, on {meta['fitted_on']} sampled images", labels, info)


def _fit_protector(
    spec: JobSpec, job: Job, generator: Generator, units: list[Unit], folder: Path, reporter: Reporter
) -> tuple[JobSpec, Generator, dict[str, Any]] | None:
    """Fit on up to ``fit_sample`` images, the first few of every unit (so every part of a
    sorted export is represented), and save the protector before any record is applied; the
    spec and generator with the settings chosen for the sample, and the protector's record.
    Class noise needs every sampled record's label (two classes or more): None otherwise, and
    units then fit their own noise."""
    per_class = method_class(job.method).fit_scope is FitScope.CLASSES
    fmt = spec.open_format()
    per_unit = max(1, math.ceil(job.fit_sample / len(units)))
    small, names = [], []
    with reporter.phase("reading the fit sample", total=min(job.fit_sample, sum(u.count for u in units))) as phase:
        for unit in units:
            taken = 0
            for record, image, problem in decoded_records(fmt.read(unit), spec):
                if taken == per_unit or len(small) == job.fit_sample:
                    break
                if image is None or problem is not None:
                    continue
                small.append(working_tensor(image, generator.config.resolution))
                names.append(record.label)
                taken += 1
                phase.advance()
    if not small:
        raise UsageError(f"no readable image in {job.source} to fit {job.method} on")
    labels: torch.Tensor | None = None
    classes: list[str] = []
    if per_class:
        classes = source_classes(names)
        if not classes:
            reporter.message(
                f"the fit sample of {job.source} has no labels with two classes or more: {job.method} noise is per "
                "class, so every unit fits its own noise instead", "warning",
            )
            return None
        labels = label_tensor(names, classes)
    images = torch.stack(small)
    sample_labels = FitLabels(labels, classes) if labels is not None else None
    spec, generator, chosen = _choose_for_fit(spec, generator, len(small), sample_labels, reporter)
    if job.fit_devices:
        with reporter.phase(f"{job.method}: fitting on {', '.join(job.fit_devices)}", total=None):
            try:
                state, fit = fit_data_parallel(job.method, generator.config, images, labels, job.fit_devices, seed=spec.seed)
            except DistributedFitError as exc:
                raise UsageError(f"--fit-devices: {exc}") from None
        generator.load_state_dict(state)
        fit = {**fit, "devices": list(job.fit_devices)}
    else:
        generator.fit(images, labels, reporter)
        fit = generator.fit_summary()
    meta = {"method": job.method, "config": spec.config, "seed": spec.seed, "classes": classes, "fitted_on": len(small), "fit": fit,
            "auto_settings": chosen}
    save_protector(folder, generator, meta)
    return spec, generator, meta


# ----------------------------------------------------------------------------------------------
# join and finish


def _join_outputs(spec: JobSpec, fmt: ExportFormat, units: list[Unit], journal: Journal, reporter: Reporter) -> None:
    if not fmt.joins_parts:
        return
    joined = journal.read().joined
    outputs: dict[str, list[Path]] = {}
    for unit in units:
        outputs.setdefault(unit.output, []).append(spec.part_path(unit))
    with reporter.phase("joining parts", total=len(outputs)) as phase:
        for output, parts in outputs.items():
            if output not in joined:
                fmt.join(output, parts, Path(spec.dest))
                journal.joined(output)
            phase.advance()


def _finish(
    summary: JobSummary, state: JournalState, state_dir: Path, settings: dict[str, Any], device: str, started: float
) -> JobSummary:
    """Totals from the journal (the same after a resume), manifest.jsonl, protection.json, and
    the state removed."""
    results = [state.units[i] for i in sorted(state.units)]
    fit_record = state.fit
    summary.written = sum(r["written"] for r in results)
    summary.copied = sum(r["copied"] for r in results)
    summary.failed = [FileFailure(key, reason) for r in results for key, reason in r["failed"]]
    summary.max_levels = max((r["max_levels"] for r in results), default=0)
    if summary.written:
        summary.mean_psnr = sum(r["psnr_sum"] for r in results) / summary.written
        summary.mean_ssim = sum(r["ssim_sum"] for r in results) / summary.written
    summary.fit = summary.fit or fit_record.get("how", "")
    summary.auto_settings = fit_record.get("auto_settings", {})
    summary.labels = fit_record.get("labels", summary.labels)
    if summary.written and summary.max_levels == 0:
        summary.problems.append(
            "no output pixel differs from its original: the copy is not protected (check the budget and the method's "
            "settings; a protector or fit may be broken)"
        )
    dest = summary.dest
    write_text_atomic(dest / MANIFEST_NAME, _manifest_text(results))
    write_text_atomic(dest / PROTECTION_NAME, json.dumps(_protection_document(summary, settings, fit_record, device, results), indent=2, sort_keys=True) + "\n")
    # The state holds the fitted noise; the journal goes last, so a kill here is finished by a rerun.
    for path in sorted(state_dir.iterdir()) if state_dir.exists() else []:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name != "journal.jsonl":
            path.unlink()
    shutil.rmtree(state_dir, ignore_errors=True)
    summary.seconds = time.perf_counter() - started
    return summary


def _manifest_text(results: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(entry, sort_keys=True) + "\n" for r in results for entry in r["manifest"])


def _per_unit_choices(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Settings chosen by units that fitted their own noise: each distinct choice once, with
    the number of units that made it."""
    groups: dict[str, dict[str, Any]] = {}
    for result in results:
        values = {key: entry["value"] for key, entry in result.get("auto_settings", {}).items()}
        if values:
            group = groups.setdefault(json.dumps(values, sort_keys=True), {"settings": values, "units": 0})
            group["units"] += 1
    return list(groups.values())


def _protection_document(
    summary: JobSummary, settings: dict[str, Any], fit_record: dict[str, Any], device_name: str, results: list[dict[str, Any]]
) -> dict[str, Any]:
    """How the copy was made. No timings: an interrupted and resumed job writes the same bytes
    as an uninterrupted one."""
    config = fit_record.get("config", settings["config"])
    device = torch.device(device_name)
    fit = {k: v for k, v in fit_record.items() if k not in ("labels", "config", "auto_settings")}
    psnr = summary.mean_psnr
    return {
        "method": settings["method"],
        "config": config,
        "eps_levels": round(config["eps"] * 255),
        "seed": settings["seed"],
        "input_format": settings["format"],
        "image_format": settings["image_format"],
        "device": str(device),
        "hardware": device_description(device),
        "precision": resolved_precision(device, config.get("precision", "fp32")),
        "labels": summary.labels,
        # defaults chosen from the folder (protect.autoset); the config above holds the values used
        "auto_settings": fit_record.get("auto_settings", {}),
        "auto_settings_per_unit": _per_unit_choices(results),
        "working_resolution": config.get("resolution"),
        "fit": fit,
        "designed_against": list(method_class(settings["method"]).designed_against(config)),
        "versions": package_versions(),
        "summary": {
            "written": summary.written,
            "copied_unchanged": summary.copied,
            "failed": [{"input": f.path, "reason": f.reason} for f in summary.failed],
            "not_images": summary.not_images,
            "max_abs_diff_levels": summary.max_levels,
            "mean_psnr_db": None if psnr is None or not math.isfinite(psnr) else round(psnr, 3),
            "mean_ssim": None if summary.mean_ssim is None else round(summary.mean_ssim, 5),
            "metrics": METHOD_NOTE,
            "problems": summary.problems,
        },
    }

"""Protect a dataset export: plan units, fit, apply on an engine, join, finish; resumable.

Phases:
1. *plan*: list the source's records as units (contiguous slices in source order).
2. *fit*: a method whose fit covers new images (``Generator.fit_scope``: one noise per class,
   a cluster protector, a text-to-noise generator) is fitted once, on a sample spread over every
   unit, and its protector saved before anything is applied (or a protector saved earlier is
   loaded with ``protector=``). A method whose noise belongs to the images it was fitted on
   fits shard by shard, inside each unit, with a seed fixed by the unit's position.
3. *apply*: units are protected on the engine, streaming, and each finished unit is journalled.
4. *join*: the parts of each output file are joined in order, atomically.

While the job is unfinished, ``DEST/.protect-batch/`` holds the journal, the parts and the
fitted protector; rerunning the same command skips what the journal lists and produces the
same bytes as an uninterrupted run. The folder is deleted when the job completes, because the
protector holds the noise itself.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from protect.batch.engines import ENGINES, EngineError, default_workers, run_units
from protect.batch.formats import ColumnOptions, FormatError, Unit, detect_format, remove_stale_temporaries
from protect.batch.journal import Journal, JournalState
from protect.batch.unit import JobSpec, decoded_records, label_tensor, new_generator
from protect.config import ConfigError
from protect.distributed import DistributedFitError, check_devices, fit_data_parallel
from protect.generator import FitScope, method_class
from protect.images import DEFAULT_MAX_PIXELS, OUTPUT_FORMATS, write_text_atomic
from protect.pipeline import PROTECTION_NAME, UsageError, _package_versions, working_tensor
from protect.protector import read_protector_meta, resolve_with_protector, save_protector
from protect.progress import NullReporter, Reporter

STATE_DIR_NAME = ".protect-batch"


@dataclass
class BatchSummary:
    """What a batch job did. ``exit_code`` is 0 when every record was done, 1 when some failed."""

    method: str
    source: Path
    dest: Path
    input_format: str
    engine: str
    units: int = 0
    units_resumed: int = 0
    written: int = 0
    copied: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    max_levels: int = 0
    fit: str = ""
    seconds: float = 0.0
    fit_seconds: float = 0.0
    apply_seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


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
    reporter: Reporter | None = None,
) -> BatchSummary:
    """Write a protected copy of the export ``source`` into the folder ``dest``, same format.

    ``fit_devices``: do the once-for-the-export fit data-parallel on these devices, one process
    each (:mod:`protect.distributed`). Raises :class:`UsageError` before writing anything when
    the request is wrong; records that cannot be protected are left out of the output and
    listed in the summary. Rerunning the same call after an interruption finishes the job
    (``dest/.protect-batch`` holds its state).
    """
    started = time.perf_counter()
    reporter = reporter or NullReporter()
    source, dest = Path(source), Path(dest)
    columns = columns or ColumnOptions()
    workers = workers or default_workers()
    _check_options(engine, output_format, allow_lossy, unit_size, fit_sample, workers)
    _check_fit_devices(method, fit_devices, protector)
    _check_paths(source, dest, save_protector_to)
    try:
        input_format = detect_format(source) if input_format == "auto" else input_format
        config, reused = resolve_with_protector(method, eps, config_file, overrides, protector)
    except (ConfigError, FormatError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    if not OUTPUT_FORMATS[output_format][2]:
        reporter.message(f"writing lossy {output_format}: re-encoding changes the noise and weakens the protection", "warning")

    state_dir = dest / STATE_DIR_NAME
    journal = Journal(state_dir / "journal.jsonl")
    settings = {
        "method": method, "config": config, "seed": seed, "format": input_format, "source": str(source.resolve()),
        "columns": asdict(columns), "image_format": output_format, "unit_size": unit_size, "fit_sample": fit_sample,
        "protector": reused.get("digest") if reused else None, "max_pixels": max_pixels,
    }
    done = _open_journal(journal, settings, dest, overwrite, reporter)
    summary = BatchSummary(method, source, dest, input_format, engine)
    if done.complete:
        return _finish(summary, journal.read(), state_dir, dest, settings, started)
    removed = remove_stale_temporaries(dest)
    if removed:
        reporter.message(f"removed {removed} unfinished temporary file(s) left by the interrupted run", "info")

    job = JobSpec(
        format=input_format, source=str(source), dest=str(dest), parts_dir=str(state_dir / "parts"), columns=columns,
        method=method, config=config, seed=seed, device=str(device), image_format=output_format, max_pixels=max_pixels,
    )
    try:
        units = list(job.open_format().units(unit_size))
    except FormatError as exc:
        raise UsageError(str(exc)) from None
    if not units:
        raise UsageError(f"no records found in {source} (read as {input_format})")
    Path(job.parts_dir).mkdir(parents=True, exist_ok=True)
    summary.units = len(units)

    fit_started = time.perf_counter()
    job, summary.fit = _fit_phase(job, units, state_dir, protector, reused, fit_sample, fit_devices, save_protector_to, reporter)
    summary.fit_seconds = time.perf_counter() - fit_started

    apply_started = time.perf_counter()
    pending = [u for u in units if u.index not in done.units]
    summary.units_resumed = len(units) - len(pending)
    if summary.units_resumed:
        reporter.message(f"resuming: {summary.units_resumed} of {len(units)} units already done", "info")
    with reporter.phase(f"protecting with {method} ({engine})", total=sum(u.count for u in units)) as phase:
        phase.advance(sum(u.count for u in units if u.index in done.units))

        def on_result(result: dict[str, Any]) -> None:
            journal.unit_done(result)
            for key, reason in result["failed"]:
                reporter.message(f"{key}: {reason}", "error")
            phase.advance(result["records"])

        try:
            run_units(engine, job, pending, on_result, workers=workers, address=address)
        except EngineError as exc:
            raise UsageError(str(exc)) from None
    summary.apply_seconds = time.perf_counter() - apply_started
    _join_outputs(job, units, journal, reporter)
    journal.completed()
    return _finish(summary, journal.read(), state_dir, dest, settings, started)


def _check_options(engine: str, output_format: str, allow_lossy: bool, unit_size: int, fit_sample: int, workers: int) -> None:
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    if not OUTPUT_FORMATS[output_format][2] and not allow_lossy:
        raise UsageError(
            f"{output_format} is lossy: re-encoding weakens or removes the protection. "
            "Pass --allow-lossy to write it anyway, or use png (default), tiff or webp (lossless)."
        )
    if unit_size < 1 or fit_sample < 1 or workers < 1:
        raise UsageError("--unit-size, --fit-sample and --workers must be at least 1")


def _check_fit_devices(method: str, fit_devices: list[str] | None, protector: Path | str | None) -> None:
    if not fit_devices:
        return
    try:
        cls = method_class(method)
        check_devices(fit_devices)
    except (ConfigError, DistributedFitError) as exc:
        raise UsageError(f"--fit-devices: {exc}") from None
    if protector is not None:
        why = "reuses the saved protector, with no fit"
    elif cls.fit_scope is FitScope.FITTED_IMAGES:
        why = "fits per unit"
    elif not cls.data_parallel_fit:
        why = "fits on one device"
    else:
        return
    raise UsageError(f"--fit-devices is for methods fitted once for the whole export on several devices; {method} {why}")


def _check_paths(source: Path, dest: Path, save_protector_to: Path | str | None) -> None:
    """Refuse anything that could write into the source or publish the noise inside DEST."""
    if not source.exists():
        raise UsageError(f"source not found: {source}")
    src, out = source.resolve(), dest.resolve()
    if src.is_dir() and out.is_relative_to(src):
        raise UsageError(f"destination {dest} is inside the source {source}; choose one outside it")
    if src.is_file() and out == src.parent:
        raise UsageError(f"destination {dest} is the folder of the source {source}: outputs would replace it; choose another")
    if src.is_relative_to(out):
        raise UsageError(f"source {source} is inside the destination {dest}; choose another destination")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"destination exists and is not a folder: {dest}")
    if save_protector_to is not None and Path(save_protector_to).resolve().is_relative_to(out):
        raise UsageError(
            f"--save-protector {save_protector_to} is inside the destination {dest}: the protector holds the noise, "
            "and publishing it with the data lets anyone remove the protection; keep it elsewhere"
        )


def _open_journal(journal: Journal, settings: dict[str, Any], dest: Path, overwrite: bool, reporter: Reporter) -> JournalState:
    """The journal of an interrupted job with the same settings, or a fresh one."""
    state = journal.read()
    if state.header is not None and not overwrite:
        if state.header != settings:
            changed = sorted(k for k in settings if state.header.get(k) != settings[k])
            raise UsageError(
                f"{dest} holds an unfinished job with other settings ({', '.join(changed)}); rerun it with the "
                "same settings to finish it, or pass --overwrite to start again"
            )
        return state
    if dest.exists() and any(p.name != journal.path.parent.name for p in dest.iterdir()) and not overwrite:
        raise UsageError(f"destination {dest} is not empty: pass --overwrite to replace the files this job writes")
    if journal.path.parent.exists():
        shutil.rmtree(journal.path.parent)
    journal.start(settings)
    return JournalState(header=settings)


def _fit_phase(
    job: JobSpec,
    units: list[Unit],
    state_dir: Path,
    protector: Path | str | None,
    reused: dict[str, Any] | None,
    fit_sample: int,
    fit_devices: list[str] | None,
    save_to: Path | str | None,
    reporter: Reporter,
) -> tuple[JobSpec, str]:
    """The job with its protector attached (fitted once), or unchanged (noise fitted per unit)."""
    scope = method_class(job.method).fit_scope
    if reused is not None:
        reporter.message(f"reusing the {job.method} protector saved in {protector}", "info")
        return _with_protector(job, Path(protector), reused["classes"]), f"saved protector ({protector})"
    if scope is FitScope.FITTED_IMAGES:
        return job, "per unit (sample-wise noise)"
    kept = state_dir / "protector"
    if (kept / "protector.json").exists():
        meta = read_protector_meta(kept)
        reporter.message("resuming: protector restored from the interrupted run", "info")
    else:
        meta = _fit_protector(job, units, kept, fit_sample, fit_devices, scope is FitScope.CLASSES, reporter)
        if meta is None:
            return job, "per unit (the source has no labels to fit class noise on)"
    if save_to is not None:
        shutil.copytree(kept, Path(save_to), dirs_exist_ok=True)
        reporter.message(f"protector saved to {save_to}; it holds the noise, keep it private", "warning")
    return _with_protector(job, kept, meta["classes"]), f"once, on {meta['fitted_on']} sampled images"


def _with_protector(job: JobSpec, folder: Path, classes: list[str]) -> JobSpec:
    return JobSpec(**{**job.__dict__, "protector": str(folder), "classes": tuple(classes)})


def _fit_protector(
    job: JobSpec, units: list[Unit], folder: Path, fit_sample: int, fit_devices: list[str] | None, per_class: bool,
    reporter: Reporter,
) -> dict[str, Any] | None:
    """Fit on up to ``fit_sample`` images, the first few of every unit (so every part of a
    sorted export is represented), and save the protector before any record is applied.
    ``per_class``: the noise is one per class, so every sampled record needs a label (None is
    returned when one has none: units then fit their own noise)."""
    generator = new_generator(job, job.seed)
    fmt = job.open_format()
    per_unit = max(1, math.ceil(fit_sample / len(units)))
    small, names = [], []
    with reporter.phase("reading the fit sample", total=min(fit_sample, sum(u.count for u in units))) as phase:
        for unit in units:
            taken = 0
            for record, image, problem in decoded_records(fmt.read(unit), job):
                if taken == per_unit or len(small) == fit_sample:
                    break
                if image is None or problem is not None:
                    continue
                if per_class and record.label is None:
                    reporter.message(
                        f"{record.key} has no label: {job.method} noise is per class, so every unit fits its own noise instead",
                        "warning",
                    )
                    return None
                small.append(working_tensor(image, generator.config.resolution))
                names.append(record.label)
                taken += 1
                phase.advance()
    if not small:
        raise UsageError(f"no readable image in {job.source} to fit {job.method} on")
    classes = sorted(set(names)) if per_class else []
    if per_class and len(classes) < 2:
        raise UsageError(f"{job.method} needs at least two classes; the fit sample has {len(classes)} ({', '.join(classes)})")
    images, labels = torch.stack(small), label_tensor(names, classes) if per_class else None
    if fit_devices:
        with reporter.phase(f"{job.method}: fitting on {', '.join(fit_devices)}", total=None):
            try:
                state, fit = fit_data_parallel(job.method, generator.config, images, labels, fit_devices, seed=job.seed)
            except DistributedFitError as exc:
                raise UsageError(f"--fit-devices: {exc}") from None
        generator.load_state_dict(state)
        fit = {**fit, "devices": list(fit_devices)}
    else:
        generator.fit(images, labels, reporter)
        fit = generator.fit_summary()
    meta = {"method": job.method, "config": job.config, "seed": job.seed, "classes": classes, "fitted_on": len(small), "fit": fit}
    save_protector(folder, generator, meta)
    return meta


def _join_outputs(job: JobSpec, units: list[Unit], journal: Journal, reporter: Reporter) -> None:
    fmt = job.open_format()
    joined = journal.read().joined
    outputs: dict[str, list[Path]] = {}
    for unit in units:
        outputs.setdefault(unit.output, []).append(job.part_path(unit))
    if not fmt.joins_parts:
        return
    with reporter.phase("joining parts", total=len(outputs)) as phase:
        for output, parts in outputs.items():
            if output not in joined:
                fmt.join(output, parts, Path(job.dest))
                journal.joined(output)
            phase.advance()


def _finish(summary: BatchSummary, state: JournalState, state_dir: Path, dest: Path, settings: dict[str, Any], started: float) -> BatchSummary:
    """Totals from the journal (the same after a resume), protection.json, and the state removed."""
    results = [state.units[i] for i in sorted(state.units)]
    summary.units = summary.units or len(results)
    summary.written = sum(r["written"] for r in results)
    summary.copied = sum(r["copied"] for r in results)
    summary.failed = [(key, reason) for r in results for key, reason in r["failed"]]
    summary.max_levels = max((r["max_levels"] for r in results), default=0)
    document = {
        "method": settings["method"],
        "config": settings["config"],
        "eps_levels": round(settings["config"]["eps"] * 255),
        "seed": settings["seed"],
        "input_format": settings["format"],
        "image_format": settings["image_format"],
        "versions": _package_versions(),
        "summary": {
            "written": summary.written,
            "copied_unchanged": summary.copied,
            "failed": [{"record": key, "reason": reason} for key, reason in summary.failed],
            "max_abs_diff_levels": summary.max_levels,
        },
    }
    # No timings in it: an interrupted and resumed job writes the same bytes as an uninterrupted one.
    write_text_atomic(dest / PROTECTION_NAME, json.dumps(document, indent=2, sort_keys=True) + "\n")
    # The state holds the fitted noise; the journal goes last, so a kill here is finished by a rerun.
    for path in sorted(state_dir.iterdir()) if state_dir.exists() else []:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name != "journal.jsonl":
            path.unlink()
    shutil.rmtree(state_dir, ignore_errors=True)
    summary.seconds = time.perf_counter() - started
    return summary

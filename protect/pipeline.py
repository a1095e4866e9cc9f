"""Protect a folder: scan, read at the working resolution, fit, apply at full resolution, write.

This is the Python API behind ``protect run``. Originals are only ever read; every output file
is written atomically; per-file problems are collected and the job goes on.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from protect.budget import apply_perturbation_uint8
from protect.cluster import pseudo_labels
from protect.config import ConfigError, config_to_dict
from protect.generator import Batch, FitScope, Generator, bounded_perturbation, create_generator, resolve_config
from protect.hardware import device_description
from protect.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    OUTPUT_FORMATS,
    FolderScan,
    ImageEntry,
    ImageReadError,
    LoadedImage,
    load_image,
    output_relpath,
    save_image_atomic,
    scan_folder,
    sha256_file,
    write_text_atomic,
)
from protect.metrics import psnr, ssim
from protect.precision import resolved_precision
from protect.progress import NullReporter, Reporter
from protect.protector import PROTECTOR_TENSORS, resolve_with_protector, save_protector

MANIFEST_NAME = "manifest.jsonl"
PROTECTION_NAME = "protection.json"
STATE_DIR_NAME = ".protect-state"


class UsageError(ValueError):
    """The job cannot start as asked (paths, options, config); nothing was written."""


@dataclass
class FileFailure:
    path: str
    reason: str


@dataclass
class RunSummary:
    """What a run did. ``exit_code`` is 0 when every image was written, 1 when some failed."""

    method: str
    input_dir: Path
    output_dir: Path
    written: int = 0
    already_done: int = 0
    failed: list[FileFailure] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)
    seconds: float = 0.0
    fit_seconds: float = 0.0
    mean_psnr: float | None = None
    mean_ssim: float | None = None
    max_levels: int = 0
    labels: str = "none"

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


@dataclass
class _WorkItem:
    entry: ImageEntry
    out_rel: PurePosixPath
    sha256: str
    index: int


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("protect", "torch", "torchvision", "numpy", "pillow", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def check_paths(input_dir: Path, output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse any combination of folders that could touch the originals or lose earlier output."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    source = input_dir.resolve()
    dest = output_dir.resolve()
    if not source.is_dir():
        raise UsageError(f"input folder not found: {input_dir}")
    if dest == source or dest.is_relative_to(source):
        raise UsageError(f"output folder {output_dir} is inside the input folder {input_dir}; choose one outside it")
    if source.is_relative_to(dest):
        raise UsageError(f"input folder {input_dir} is inside the output folder {output_dir}; choose another output")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"output path exists and is not a folder: {output_dir}")
    if dest.exists() and any(dest.iterdir()) and not (resume or overwrite):
        raise UsageError(
            f"output folder {output_dir} is not empty: pass --resume to finish an interrupted run, "
            "or --overwrite to replace the files this run writes"
        )


def working_tensor(image: LoadedImage, resolution: int) -> torch.Tensor:
    """uint8 (3, R, R): the image resized (area-averaged) to the working resolution."""
    small = Image.fromarray(image.rgb).resize((resolution, resolution), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small).copy()).permute(2, 0, 1)


def to_image_size(delta: torch.Tensor, width: int, height: int) -> np.ndarray:
    """Map a (3, R, R) working-resolution perturbation to an (H, W, 3) array. Bilinear
    interpolation never leaves the range of its inputs, so the eps ball is kept."""
    if delta.shape[-2:] != (height, width):
        delta = F.interpolate(delta[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return delta.permute(1, 2, 0).numpy()


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """Records of a previous run by input path; a torn last line (from a kill) is ignored."""
    records: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[record["input"]] = record
    return records


def _append_line(handle, record: dict[str, Any]) -> None:
    handle.write(json.dumps(record, sort_keys=True) + "\n")
    handle.flush()


class _State:
    """The fitted generator and the data it was fitted on, kept for ``--resume``.

    It holds the noise itself, so it is deleted when a run completes without failures."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tensors = directory / "generator.safetensors"
        self.meta = directory / "state.json"

    def exists(self) -> bool:
        return self.tensors.exists() and self.meta.exists()

    def save(self, generator: Generator, meta: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.tensors.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(tmp))
        tmp.replace(self.tensors)
        write_text_atomic(self.meta, json.dumps(meta, sort_keys=True))

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return load_file(str(self.tensors)), json.loads(self.meta.read_text(encoding="utf-8"))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _assign_labels(
    scan: FolderScan, items: list[_WorkItem], images: torch.Tensor, generator: Generator, reporter: Reporter
) -> tuple[torch.Tensor | None, str]:
    if scan.labelled:
        index = {name: i for i, name in enumerate(scan.classes)}
        labels = torch.tensor([index[item.entry.label] for item in items], dtype=torch.long)
        present = sorted({item.entry.label for item in items})
        if generator.needs_labels and len(present) < 2:
            raise UsageError(
                f"{generator.name} needs at least two classes; {scan.root} has readable images in "
                f"{len(present)} ({', '.join(present)}). Use one subfolder per class, or a flat folder to cluster."
            )
        return labels, f"folders ({len(scan.classes)} classes)"
    if not generator.needs_labels:
        return None, "none"
    k = min(generator.config.pseudo_label_k, len(items))
    reporter.message(
        f"no class subfolders in {scan.root}: {generator.name} needs labels, so the {len(items)} images are "
        f"clustered into {k} pseudo-classes by k-means on surrogate features"
    )
    labels = pseudo_labels(
        images, k, surrogate=generator.config.surrogate, device=generator.device, seed=generator.seed
    )
    return labels, f"pseudo (k-means on surrogate features, k={k})"


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
    reporter: Reporter | None = None,
    protector: Path | str | None = None,
    save_protector_to: Path | str | None = None,
) -> RunSummary:
    """Write a protected copy of ``input_dir`` into ``output_dir`` with ``method``.

    The copy mirrors the tree (PNG by default), each image within ``round(eps*255)`` levels of
    its original in every channel, plus ``manifest.jsonl`` (one record per image) and
    ``protection.json`` (resolved config, seed, versions, summary). Raises :class:`UsageError`
    before writing anything when the request itself is wrong; per-file problems are reported in
    the returned summary instead.

    ``protector``: a folder written by ``save_protector_to`` (or ``protect batch``): its fitted
    state is loaded and nothing is fitted. ``save_protector_to``: keep the fitted state there
    (outside both folders: it holds the noise) for methods whose fit protects later images
    (class-wise noise on labelled folders, ``clusters``).
    """
    started = time.perf_counter()
    reporter = reporter or NullReporter()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(f"unknown output format {output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    _, suffix, lossless, _ = OUTPUT_FORMATS[output_format]
    if not lossless and not allow_lossy:
        raise UsageError(
            f"{output_format} is lossy: re-encoding weakens or removes the protection. "
            "Pass --allow-lossy to write it anyway, or use png (default), tiff or webp (lossless)."
        )
    check_paths(input_dir, output_dir, resume=resume, overwrite=overwrite)
    _check_protector_folder(save_protector_to, input_dir, output_dir)
    try:
        reused = _protector_settings(protector, method, eps, config_file, overrides)
        if reused is not None:
            config_file, overrides, eps = None, reused["config"], None
        config = resolve_config(method, config_file=config_file, overrides=overrides, eps=eps)
        generator = create_generator(method, config, device=device, seed=seed)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if not lossless:
        reporter.message(
            f"writing lossy {output_format}: re-encoding changes the noise and weakens the protection", "warning"
        )

    scan = scan_folder(input_dir)
    if save_protector_to is not None and not generator.fit_scope.covers_new_images(scan.labelled):
        raise UsageError(
            f"{method} cannot save a protector for {input_dir}: its noise belongs to the images it was fitted on; "
            "protectors are kept for class-wise methods on labelled folders and for methods whose fit covers any image (clusters, t2ue)"
        )
    if not scan.entries:
        kinds = ", ".join(sorted(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES))
        raise UsageError(f"no images found in {input_dir} (looked for: {kinds})")
    summary = RunSummary(method=method, input_dir=input_dir, output_dir=output_dir)
    summary.not_images = [str(p) for p in scan.not_images]
    for path in scan.not_images:
        reporter.message(f"{path}: skipped, not an image file", "info")

    output_dir.mkdir(parents=True, exist_ok=True)
    state = _State(output_dir / STATE_DIR_NAME)
    resolved = config_to_dict(config)
    saved_state = None
    if resume and state.exists():
        saved_state = state.load()
        if saved_state[1]["method"] != method or saved_state[1]["config"] != resolved or saved_state[1]["seed"] != seed:
            raise UsageError(
                f"{output_dir} was started with other settings ({saved_state[1]['method']}, seed "
                f"{saved_state[1]['seed']}); rerun with those, or use --overwrite to start again"
            )

    # Phase 1: read every image once at the working resolution.
    taken: set[PurePosixPath] = set()
    out_names = {entry.relpath: output_relpath(entry.relpath, suffix, taken) for entry in scan.entries}
    items: list[_WorkItem] = []
    small: list[torch.Tensor] = []
    with reporter.phase("reading images", total=len(scan.entries)) as phase:
        for entry in scan.entries:
            try:
                image = load_image(entry.path, max_pixels)
            except ImageReadError as exc:
                _record_failure(summary, reporter, entry.path, exc.reason)
            else:
                for note in image.notes:
                    reporter.message(f"{entry.path}: {note}", "info")
                items.append(_WorkItem(entry, out_names[entry.relpath], image.sha256, len(items)))
                small.append(working_tensor(image, config.resolution))
            phase.advance()
    if not items:
        _write_protection(output_dir, generator, resolved, summary, started, {})
        summary.seconds = time.perf_counter() - started
        return summary
    images = torch.stack(small)

    # Phase 2: fit (or restore the fit of the interrupted run).
    fit_info: dict[str, Any]
    inputs = [[str(item.entry.relpath), item.sha256] for item in items]
    if saved_state is not None:
        tensors, meta = saved_state
        if meta["inputs"] != inputs:
            raise UsageError(
                f"the images in {input_dir} changed since the interrupted run; use --overwrite to start again"
            )
        generator.load_state_dict(tensors)
        labels = torch.tensor(meta["labels"], dtype=torch.long) if meta["labels"] is not None else None
        summary.labels = meta["label_source"]
        fit_info = meta["fit"]
        reporter.message(f"resuming: fitted {method} restored from {state.directory}")
    elif reused is not None:
        labels = _protector_labels(reused, scan, items)
        try:
            generator.load_state_dict(reused["tensors"])
        except ValueError as exc:
            raise UsageError(f"{protector}: {exc}") from None
        summary.labels = f"protector classes ({len(reused['classes'])})" if labels is not None else "none"
        fit_info = {"protector_sha256": reused["digest"], "protector_fitted_on": reused.get("fitted_on")}
        reporter.message(f"reusing the {method} protector saved in {protector}: nothing is fitted")
    else:
        labels, summary.labels = _assign_labels(scan, items, images, generator, reporter)
        fit_start = time.perf_counter()
        generator.fit(images, labels, reporter)
        summary.fit_seconds = time.perf_counter() - fit_start
        fit_info = generator.fit_summary()
        fit_info["seconds"] = round(summary.fit_seconds, 3)
        state.save(
            generator,
            {
                "method": method,
                "config": resolved,
                "seed": seed,
                "inputs": inputs,
                "labels": labels.tolist() if labels is not None else None,
                "label_source": summary.labels,
                "fit": fit_info,
            },
        )

    if save_protector_to is not None and reused is None:
        _save_fitted_protector(Path(save_protector_to), generator, resolved, scan, len(items), fit_info, reporter)

    # Phase 3: apply at full resolution and write.
    manifest_path = output_dir / MANIFEST_NAME
    previous = _read_manifest(manifest_path) if resume else {}
    psnrs: list[float] = []
    ssims: list[float] = []
    # Records of files already done are re-appended in order as they are confirmed valid.
    with open(manifest_path, "w", encoding="utf-8") as manifest:
        with reporter.phase(f"protecting with {method}", total=len(items)) as phase:
            for chunk_start in range(0, len(items), config.batch_size):
                chunk = items[chunk_start : chunk_start + config.batch_size]
                index = torch.tensor([item.index for item in chunk])
                batch = Batch(
                    images=images[index].float().div(255).to(generator.device),
                    labels=labels[index].to(generator.device) if labels is not None else None,
                    indices=index.to(generator.device),
                    paths=[str(item.entry.relpath) for item in chunk],
                    class_names=[item.entry.label for item in chunk] if scan.labelled else None,
                )
                try:
                    with torch.no_grad():
                        deltas = bounded_perturbation(generator, batch).cpu()
                except ConfigError as exc:
                    # e.g. an image with no caption in the captions file: files written so far are complete
                    raise UsageError(str(exc)) from None
                for item, delta in zip(chunk, deltas):
                    record = _protect_one(
                        item, delta, labels, scan.labelled, generator, output_dir,
                        output_format, max_pixels, previous, summary, reporter, psnrs, ssims,
                    )
                    if record is not None:
                        _append_line(manifest, record)
                    phase.advance()

    summary.mean_psnr = float(np.mean(psnrs)) if psnrs else None
    summary.mean_ssim = float(np.mean(ssims)) if ssims else None
    summary.seconds = time.perf_counter() - started
    # The run is complete: the saved fit (which holds the noise itself) is no longer needed.
    state.remove()
    if summary.failed:
        reporter.message(
            f"{len(summary.failed)} file(s) failed; fix or remove them and rerun with --overwrite to protect them too",
            "warning",
        )
    _write_protection(output_dir, generator, resolved, summary, started, fit_info)
    return summary


# ----------------------------------------------------------------------------------------------
# protectors: a fitted state kept to protect later images without fitting again (the format of
# ``protect batch``: protector.safetensors + protector.json)


def _check_protector_folder(folder: Path | str | None, input_dir: Path, output_dir: Path) -> None:
    if folder is None:
        return
    target = Path(folder).resolve()
    for name, where in (("output", output_dir), ("input", input_dir)):
        if target == where.resolve() or target.is_relative_to(where.resolve()):
            raise UsageError(
                f"--save-protector {folder} is inside the {name} folder {where}: the protector holds the noise, and "
                "whoever has it can remove the protection; keep it somewhere private"
            )


def _protector_settings(
    protector: Path | str | None, method: str, eps: float | None, config_file: Path | None, overrides: dict[str, Any] | None
) -> dict[str, Any] | None:
    """A saved protector's metadata and tensors, checked against the request (None: no protector)."""
    if protector is None:
        return None
    try:
        _, meta = resolve_with_protector(method, eps, config_file, overrides, protector)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    return {**meta, "tensors": load_file(str(Path(protector) / PROTECTOR_TENSORS))}


def _protector_labels(reused: dict[str, Any], scan: FolderScan, items: list[_WorkItem]) -> torch.Tensor | None:
    """Labels in the protector's class order (class-wise protectors), or None."""
    classes = reused.get("classes") or []
    if not classes:
        return None
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({item.entry.label for item in items if item.entry.label not in index}, key=str)
    if not scan.labelled or unknown:
        raise UsageError(
            f"the protector holds one noise per class ({', '.join(classes)}); {scan.root} must use those class "
            f"subfolders" + (f" (not: {', '.join(map(str, unknown))})" if scan.labelled else "")
        )
    return torch.tensor([index[item.entry.label] for item in items], dtype=torch.long)


def _save_fitted_protector(
    folder: Path, generator: Generator, resolved: dict[str, Any], scan: FolderScan, fitted_on: int,
    fit_info: dict[str, Any], reporter: Reporter,
) -> None:
    classes = list(scan.classes) if generator.fit_scope is FitScope.CLASSES else []
    meta = {"method": generator.name, "config": resolved, "seed": generator.seed, "classes": classes,
            "fitted_on": fitted_on, "fit": fit_info}
    save_protector(folder, generator, meta)
    reporter.message(f"protector saved to {folder}; it holds the noise, keep it private", "warning")


def _record_failure(summary: RunSummary, reporter: Reporter, path: Path, reason: str) -> None:
    summary.failed.append(FileFailure(str(path), reason))
    reporter.message(f"{path}: {reason}", "error")


def _protect_one(
    item: _WorkItem,
    delta: torch.Tensor,
    labels: torch.Tensor | None,
    labelled: bool,
    generator: Generator,
    output_dir: Path,
    output_format: str,
    max_pixels: int,
    previous: dict[str, dict[str, Any]],
    summary: RunSummary,
    reporter: Reporter,
    psnrs: list[float],
    ssims: list[float],
) -> dict[str, Any] | None:
    """Write one protected image and return its manifest record (None when it failed)."""
    out_path = output_dir / item.out_rel
    key = str(item.entry.relpath)
    done = previous.get(key)
    if done is not None and done.get("input_sha256") == item.sha256 and out_path.exists():
        if sha256_file(out_path) == done.get("output_sha256"):
            summary.already_done += 1
            return done
    try:
        image = load_image(item.entry.path, max_pixels)
    except ImageReadError as exc:
        _record_failure(summary, reporter, item.entry.path, exc.reason)
        return None
    if image.sha256 != item.sha256:
        _record_failure(summary, reporter, item.entry.path, "changed while the job was running; rerun to protect the new version")
        return None
    width, height = image.size
    protected = apply_perturbation_uint8(image.rgb, to_image_size(delta, width, height), generator.config.eps)
    save_image_atomic(out_path, protected, image.alpha, output_format, image.icc_profile)
    summary.written += 1
    summary.max_levels = max(summary.max_levels, int(np.abs(protected.astype(np.int16) - image.rgb).max()))
    psnrs.append(psnr(image.rgb, protected))
    ssims.append(ssim(image.rgb, protected))
    record: dict[str, Any] = {
        "input": key,
        "output": str(item.out_rel),
        "input_sha256": item.sha256,
        "output_sha256": sha256_file(out_path),
        "label": item.entry.label if labelled else None,
        "method": generator.name,
        "eps": generator.config.eps,
        "seed": generator.seed,
        "size": [width, height],
    }
    if labels is not None and not labelled:
        record["pseudo_label"] = int(labels[item.index])
    return record


def _write_protection(
    output_dir: Path,
    generator: Generator,
    resolved: dict[str, Any],
    summary: RunSummary,
    started: float,
    fit_info: dict[str, Any],
) -> None:
    document = {
        "method": generator.name,
        "config": resolved,
        "eps_levels": round(generator.config.eps * 255),
        "seed": generator.seed,
        "device": str(generator.device),
        "hardware": device_description(generator.device),
        "precision": resolved_precision(generator.device, generator.config.precision),
        "labels": summary.labels,
        "fit": fit_info,
        "versions": _package_versions(),
        "summary": {
            "written": summary.written,
            "already_done": summary.already_done,
            "failed": [{"path": f.path, "reason": f.reason} for f in summary.failed],
            "not_images": summary.not_images,
            "max_abs_diff_levels": summary.max_levels,
            "mean_psnr_db": None if summary.mean_psnr is None or not math.isfinite(summary.mean_psnr) else round(summary.mean_psnr, 3),
            "mean_ssim": None if summary.mean_ssim is None else round(summary.mean_ssim, 5),
            "seconds": round(time.perf_counter() - started, 3),
        },
    }
    write_text_atomic(output_dir / PROTECTION_NAME, json.dumps(document, indent=2, sort_keys=True) + "\n")

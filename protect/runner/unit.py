"""Protect one unit: read its records, perturb them in small chunks, write its part.

This is what every engine runs, in the driver process, a local worker process or a Ray task.
It only needs the picklable :class:`JobSpec` and :class:`Unit`, so it behaves identically
wherever it runs: the seed of a unit's own fit depends only on the job seed and the unit's
position.

Where a record's noise comes from is decided by the job's fit (see :mod:`protect.runner.job`):

- a fit of the whole source (``fit_index``): the record's row and label in that fit, found by
  its name (and refused when its bytes changed since the fit);
- a protector fitted once for the job, or saved earlier (``protector``): class-wise noise by
  the record's label, or noise that covers any image;
- otherwise the unit fits its own noise on its own images (sample-wise methods in exports).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from safetensors.torch import load_file

from protect.budget import check_budget, perturb_uint8
from protect.config import ConfigError
from protect.generator import Batch, Generator, bounded_perturbation, create_generator, resolve_config
from protect.images import DEFAULT_MAX_BYTES, OUTPUT_FORMATS, ImageReadError, LoadedImage, decode_image, encode_image
from protect.metrics import psnr, ssim
from protect.protector import PROTECTOR_TENSORS
from protect.runner.auto import fit_choices
from protect.runner.formats import ColumnOptions, ExportFormat, Record, Unit, open_format
from protect.runner.labels import labels_for_fit
from protect.scale import to_image_size, working_tensor

# Images decoded at full resolution at a time: at most this many, and no more pixels than
# CHUNK_PIXELS unless one image alone has more. Bounds a worker's memory whatever the unit size.
CHUNK_IMAGES = 32
CHUNK_PIXELS = 16_000_000
# Rows of an image whose noise is rounded and added at a time (bounds the float temporaries).
APPLY_ROWS = 256


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to protect any unit of the job (picklable, no open handles).

    ``protector`` is a folder holding a generator fitted once for the whole job (None: each
    unit fits its own noise); ``classes`` are the label names that protector was fitted with;
    ``fit_index`` is the JSON file listing the images of a whole-source fit (their rows and
    labels). ``threads``: torch threads while a unit runs (1 makes a unit's bytes the same in
    the driver, a local worker or a Ray task; None keeps the process's setting). ``fixed_keys``:
    the config keys the user set, which no rule of :mod:`protect.autoset` changes;
    ``image_side``: the images' median shorter side, when a rule needed it."""

    format: str
    source: str
    dest: str
    parts_dir: str
    columns: ColumnOptions
    method: str
    config: dict[str, Any]
    seed: int
    device: str
    image_format: str
    max_pixels: int
    max_bytes: int = DEFAULT_MAX_BYTES
    allow_outside: bool = False
    keep_other_files: bool = True
    threads: int | None = 1
    protector: str | None = None
    classes: tuple[str, ...] | None = None
    fit_index: str | None = None
    fixed_keys: tuple[str, ...] = ()
    image_side: int | None = None

    def open_format(self) -> ExportFormat:
        return open_format(
            self.format, Path(self.source), self.columns, OUTPUT_FORMATS[self.image_format][1],
            keep_other_files=self.keep_other_files, max_bytes=self.max_bytes, allow_outside=self.allow_outside,
        )

    def part_path(self, unit: Unit) -> Path:
        return Path(self.parts_dir) / f"{unit.index:08d}.part"


@dataclass
class _Tally:
    written: int = 0
    copied: int = 0
    max_levels: int = 0
    psnr_sum: float = 0.0
    ssim_sum: float = 0.0
    failed: list[list[str]] = field(default_factory=list)
    notes: list[list[str]] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the record key of each entry

    def fail(self, key: str, reason: str) -> None:
        self.failed.append([key, reason])

    def unwritten(self, key: str, reason: str) -> None:
        """A record protected but not written: failed, and out of the manifest and the totals."""
        self.fail(key, reason)
        if key in self.keys:
            position = self.keys.index(key)
            del self.keys[position], self.entries[position]
            self.written -= 1


def unit_seed(seed: int, unit_index: int) -> int:
    """The seed a unit fits its own noise with: fixed by the job seed and the unit's position."""
    digest = hashlib.sha256(f"{seed}:{unit_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def new_generator(job: JobSpec, seed: int) -> Generator:
    config = resolve_config(job.method, overrides=job.config)
    return create_generator(job.method, config, device=job.device, seed=seed)


# ----------------------------------------------------------------------------------------------
# fits made once for the job


_LOADED: dict[str, Generator] = {}


def _protector_key(job: JobSpec) -> str:
    return f"{job.protector}:{job.method}:{job.seed}:{job.device}"


def remember_protector(job: JobSpec, generator: Generator) -> None:
    """Hand the driver's fitted generator to units run in this process (no reload from disk)."""
    _LOADED.clear()
    _LOADED[_protector_key(job)] = generator


def _loaded_protector(job: JobSpec) -> Generator:
    """The job's protector, loaded once per worker process."""
    key = _protector_key(job)
    if key not in _LOADED:
        generator = new_generator(job, job.seed)
        generator.load_state_dict(load_file(str(Path(job.protector) / PROTECTOR_TENSORS)))
        remember_protector(job, generator)
    return _LOADED[key]


@lru_cache(maxsize=1)
def read_fit_index(path: str) -> dict[str, Any]:
    """The images of a whole-source fit: ``rows`` {name: [row, sha256]}, ``labels`` (one per
    row, or None) and ``pseudo`` (whether those are k-means pseudo-labels)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# where a record's noise comes from: (row in the fit, label), or ValueError with the reason

Placement = Callable[[Record, LoadedImage], tuple[int, int | None]]


def _placement_in_fit(job: JobSpec) -> tuple[Placement, bool]:
    index = read_fit_index(job.fit_index)
    rows, labels = index["rows"], index["labels"]

    def place(record: Record, image: LoadedImage) -> tuple[int, int | None]:
        if record.name not in rows:
            raise ValueError("was not readable when the noise was fitted; rerun with --overwrite to protect it")
        row, digest = rows[record.name]
        if digest != image.sha256:
            raise ValueError("changed since the noise was fitted; rerun with --overwrite to protect the new version")
        return row, None if labels is None else labels[row]

    return place, index["pseudo"]


def _placement_by_class(job: JobSpec) -> Placement:
    classes = list(job.classes or ())
    index = {name: i for i, name in enumerate(classes)}
    counter = iter(range(1 << 62))

    def place(record: Record, image: LoadedImage) -> tuple[int, int | None]:
        row = next(counter)
        if not classes:
            return row, None
        if record.label is None:
            raise ValueError(f"no label, and {job.method} noise is fitted per class ({len(classes)} classes)")
        if record.label not in index:
            shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            raise ValueError(f"label {record.label!r} is not one of the classes the protector was fitted on ({shown})")
        return row, index[record.label]

    return place


def decoded_records(records: Iterable[Record], job: JobSpec) -> Iterator[tuple[Record, LoadedImage | None, str | None]]:
    """Each record with its decoded image (None when there is none to protect) and, when it
    cannot be used, the reason."""
    for record in records:
        if record.error:
            yield record, None, record.error
        elif record.image is None:
            yield record, None, None
        else:
            try:
                yield record, decode_image(record.image, record.key, job.max_pixels), None
            except ImageReadError as exc:
                yield record, None, exc.reason


# ----------------------------------------------------------------------------------------------
# the unit


@contextmanager
def _threads(count: int) -> Iterator[None]:
    # Float results of the fits can depend on torch's thread count; one thread per unit makes a
    # unit's bytes the same in the driver, a local worker or a Ray task (and one unit per core is
    # how the engines use the machine anyway).
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def process_unit(job: JobSpec, unit: Unit) -> dict[str, Any]:
    """Protect ``unit`` and write its part; returns the journal record of the unit."""
    with _threads(job.threads) if job.threads else nullcontext():
        return _process_unit(job, unit)


def _process_unit(job: JobSpec, unit: Unit) -> dict[str, Any]:
    started = time.perf_counter()
    fmt = job.open_format()
    tally = _Tally()
    pseudo = False
    chosen: dict[str, Any] = {}
    if job.fit_index is not None:
        generator = _loaded_protector(job)
        place, pseudo = _placement_in_fit(job)
    elif job.protector is not None:
        generator, place = _loaded_protector(job), _placement_by_class(job)
    else:
        generator, place, pseudo, chosen = _fit_unit(job, unit, fmt)
    records = _protect_records(fmt.read(unit), generator, place, pseudo, job, tally)
    for key, reason in fmt.write_part(unit, records, job.part_path(unit), Path(job.dest)):
        tally.unwritten(key, reason)
    return {
        "unit": unit.index,
        "output": unit.output,
        "records": unit.count,
        "written": tally.written,
        "copied": tally.copied,
        "failed": tally.failed,
        "notes": tally.notes,
        "max_levels": tally.max_levels,
        "psnr_sum": tally.psnr_sum,
        "ssim_sum": tally.ssim_sum,
        "manifest": tally.entries,
        "seconds": round(time.perf_counter() - started, 3),
        **({"auto_settings": chosen} if chosen else {}),
    }


def _fit_unit(job: JobSpec, unit: Unit, fmt: ExportFormat) -> tuple[Generator, Placement, bool, dict[str, Any]]:
    """Fit a fresh generator on the unit's own images (sample-wise methods optimise shard by
    shard), with the settings chosen for them (also returned)."""
    generator = new_generator(job, unit_seed(job.seed, unit.index))
    small, names = [], []
    for record, image, problem in decoded_records(fmt.read(unit), job):
        if image is not None and problem is None:
            small.append(working_tensor(image, generator.config.resolution))
            names.append(record.label)
    counter = iter(range(1 << 62))
    if not small:
        return generator, lambda record, image: (next(counter), None), False, {}
    images = torch.stack(small)
    fit = labels_for_fit(names, images, generator)
    config, chosen = fit_choices(generator, job.config, job.fixed_keys, len(images), fit, job.image_side)
    if chosen:
        generator = new_generator(replace(job, config=config), generator.seed)
    generator.fit(images, fit.labels)

    def place(record: Record, image: LoadedImage) -> tuple[int, int | None]:
        row = next(counter)
        return row, None if fit.labels is None else int(fit.labels[row])

    return generator, place, fit.pseudo, chosen


_Pending = tuple[Record, LoadedImage | None, int | None, int]


def _protect_records(
    records: Iterable[Record], generator: Generator, place: Placement, pseudo: bool, job: JobSpec, tally: _Tally
) -> Iterator[tuple[Record, bytes | None]]:
    """The records in order, each with its protected image bytes (None when it has no image or
    failed), decoding at most :data:`CHUNK_IMAGES` images at a time."""
    pending: list[_Pending] = []
    images_pending = pixels_pending = 0
    for record, image, problem in decoded_records(records, job):
        if problem is None and image is not None:
            try:
                row, label = place(record, image)
            except ValueError as exc:
                problem, image = str(exc), None
            else:
                pending.append((record, image, label, row))
                images_pending += 1
                pixels_pending += image.size[0] * image.size[1]
                tally.notes.extend([record.key, note] for note in image.notes)
        if problem is not None:
            tally.fail(record.key, problem)
            pending.append((record, None, None, -1))
        elif image is None:
            tally.copied += 1
            pending.append((record, None, None, -1))
        if images_pending >= CHUNK_IMAGES or pixels_pending >= CHUNK_PIXELS:
            yield from _protect_chunk(pending, generator, pseudo, job, tally)
            pending, images_pending, pixels_pending = [], 0, 0
    yield from _protect_chunk(pending, generator, pseudo, job, tally)


def _records_batch(todo: list[_Pending], generator: Generator) -> Batch:
    resolution, device = generator.config.resolution, generator.device
    labels = [label for _, _, label, _ in todo]
    records = [record for record, *_ in todo]
    return Batch(
        images=torch.stack([working_tensor(image, resolution) for _, image, _, _ in todo]).float().div(255).to(device),
        labels=None if labels[0] is None else torch.tensor(labels, dtype=torch.long, device=device),
        indices=torch.tensor([row for *_, row in todo], dtype=torch.long, device=device),
        paths=[record.name or record.key for record in records],
        class_names=[record.label for record in records],
        captions=[record.caption for record in records],
    )


@torch.no_grad()
def _chunk_perturbations(todo: list[_Pending], generator: Generator, tally: _Tally) -> dict[int, torch.Tensor]:
    """Bounded perturbations by row. A record the method refuses (e.g. no caption for a
    text-driven method) is failed by name and the others are still done."""
    if not todo:
        return {}
    try:
        bounded = bounded_perturbation(generator, _records_batch(todo, generator)).cpu()
        deltas = {}
        for (record, *_, row), delta in zip(todo, bounded):
            if torch.isfinite(delta).all():
                deltas[row] = delta
            else:
                tally.fail(record.key, f"{generator.name} returned noise that is not a number (NaN or inf): its fit or "
                           "protector is broken; nothing was written for it")
        return deltas
    except ConfigError as exc:
        if len(todo) == 1:
            tally.fail(todo[0][0].key, str(exc))
            return {}
    deltas: dict[int, torch.Tensor] = {}
    for item in todo:
        deltas.update(_chunk_perturbations([item], generator, tally))
    return deltas


def _protect_chunk(
    pending: list[_Pending], generator: Generator, pseudo: bool, job: JobSpec, tally: _Tally
) -> Iterator[tuple[Record, bytes | None]]:
    todo = [item for item in pending if item[1] is not None]
    deltas = _chunk_perturbations(todo, generator, tally)
    eps = generator.config.eps
    for record, image, label, row in pending:
        if image is None or row not in deltas:
            yield record, None
            continue
        width, height = image.size
        try:
            protected, levels = _apply(image.rgb, deltas[row], eps)
            encoded = encode_image(protected, image.alpha, job.image_format, image.icc_profile)
            quality = psnr(image.rgb, protected), ssim(image.rgb, protected)
        except MemoryError:
            # Nothing of it is written yet; the record fails by name and the job goes on.
            tally.fail(record.key, f"ran out of memory while protecting it ({width}x{height}); lower --max-pixels "
                       "or free memory")
            yield record, None
            continue
        tally.written += 1
        tally.max_levels = max(tally.max_levels, levels)
        tally.psnr_sum += quality[0]
        tally.ssim_sum += quality[1]
        entry: dict[str, Any] = {
            "input": record.name or record.key,
            "output": record.output,
            "input_sha256": image.sha256,
            "output_sha256": hashlib.sha256(encoded).hexdigest(),
            "label": record.label,
            "method": job.method,
            "eps": eps,
            "seed": job.seed,
            "size": [width, height],
        }
        if pseudo and label is not None:
            entry["pseudo_label"] = label
        if image.notes:
            entry["notes"] = image.notes
        tally.entries.append(entry)
        tally.keys.append(record.key)
        yield record, encoded


def _apply(rgb: np.ndarray, delta: torch.Tensor, eps: float) -> tuple[np.ndarray, int]:
    """The protected copy of ``rgb`` (uint8 H x W x 3) with the working-resolution ``delta``
    mapped to its size, rounded to levels and added a band of rows at a time, so the float
    temporaries of a large photo stay small; and its largest change in levels, checked
    against the budget."""
    height, width = rgb.shape[:2]
    full = torch.from_numpy(to_image_size(delta, width, height))  # (H, W, 3) float32 view
    protected = np.empty_like(rgb)
    largest = 0
    for top in range(0, height, APPLY_ROWS):
        rows = slice(top, top + APPLY_ROWS)
        protected[rows] = perturb_uint8(torch.from_numpy(rgb[rows]), full[rows].contiguous(), eps).numpy()
        largest = max(largest, check_budget(rgb[rows], protected[rows], eps))
    return protected, largest

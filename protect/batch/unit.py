"""Protect one unit: read its records, perturb them in small chunks, write its part.

This is what every engine runs, in the driver process, a local worker process or a Ray task.
It only needs the picklable :class:`JobSpec` and :class:`Unit`, so it behaves identically
wherever it runs: the seed of a unit depends only on the job seed and the unit's position.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from safetensors.torch import load_file

from protect.batch.formats import ColumnOptions, ExportFormat, Record, Unit, open_format
from protect.budget import apply_perturbation_uint8
from protect.cluster import pseudo_labels
from protect.config import ConfigError
from protect.generator import Batch, Generator, bounded_perturbation, create_generator, resolve_config
from protect.images import OUTPUT_FORMATS, ImageReadError, LoadedImage, decode_image, encode_image
from protect.pipeline import to_image_size, working_tensor
from protect.protector import PROTECTOR_TENSORS

# Images decoded at full resolution at a time: bounds a worker's memory whatever the unit size.
CHUNK_IMAGES = 32


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to protect any unit of the job (picklable, no open handles).

    ``protector`` is a folder holding a protector fitted once for the whole job (None: each unit
    fits its own noise); ``classes`` are the label names that protector was fitted with."""

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
    protector: str | None = None
    classes: tuple[str, ...] | None = None

    def open_format(self) -> ExportFormat:
        return open_format(self.format, Path(self.source), self.columns, OUTPUT_FORMATS[self.image_format][1])

    def part_path(self, unit: Unit) -> Path:
        return Path(self.parts_dir) / f"{unit.index:08d}.part"


@dataclass
class _Tally:
    written: int = 0
    copied: int = 0
    max_levels: int = 0
    failed: list[list[str]] = field(default_factory=list)

    def fail(self, key: str, reason: str) -> None:
        self.failed.append([key, reason])


def unit_seed(seed: int, unit_index: int) -> int:
    """The seed a unit fits its own noise with: fixed by the job seed and the unit's position."""
    digest = hashlib.sha256(f"{seed}:{unit_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def new_generator(job: JobSpec, seed: int) -> Generator:
    config = resolve_config(job.method, overrides=job.config)
    return create_generator(job.method, config, device=job.device, seed=seed)


# ----------------------------------------------------------------------------------------------
# protectors fitted once and reused


_LOADED: dict[str, Generator] = {}


def _loaded_protector(job: JobSpec) -> Generator:
    """The job's protector, loaded once per worker process."""
    key = f"{job.protector}:{job.method}:{job.seed}:{job.device}"
    if key not in _LOADED:
        generator = new_generator(job, job.seed)
        generator.load_state_dict(load_file(str(Path(job.protector) / PROTECTOR_TENSORS)))
        _LOADED.clear()
        _LOADED[key] = generator
    return _LOADED[key]


# ----------------------------------------------------------------------------------------------
# labels


def label_tensor(names: list[str | None], classes: list[str]) -> torch.Tensor:
    index = {name: i for i, name in enumerate(classes)}
    return torch.tensor([index[name] for name in names], dtype=torch.long)


def _fit_labels(generator: Generator, images: torch.Tensor, names: list[str | None]) -> torch.Tensor | None:
    """Labels for a unit's own fit: its records' labels when it has two classes or more;
    otherwise, for a method that needs labels, k-means pseudo-labels on surrogate features."""
    present = sorted({n for n in names if n is not None})
    if len(present) >= 2 and None not in names:
        return label_tensor(names, present)
    if not generator.needs_labels:
        return None
    k = min(generator.config.pseudo_label_k, len(images))
    if k < 2:
        return torch.zeros(len(images), dtype=torch.long)
    return pseudo_labels(images, k, surrogate=generator.config.surrogate, device=generator.device, seed=generator.seed)


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
def _one_thread() -> Iterator[None]:
    # Float results of the fits can depend on torch's thread count; one thread per unit makes a
    # unit's bytes the same in the driver, a local worker or a Ray task (and one unit per core is
    # how the engines use the machine anyway).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def process_unit(job: JobSpec, unit: Unit) -> dict[str, Any]:
    """Protect ``unit`` and write its part; returns the journal record of the unit."""
    with _one_thread():
        return _process_unit(job, unit)


def _process_unit(job: JobSpec, unit: Unit) -> dict[str, Any]:
    started = time.perf_counter()
    fmt = job.open_format()
    tally = _Tally()
    if job.protector is not None:
        generator = _loaded_protector(job)
        label_of = _label_from_classes(job)
    else:
        generator, label_of = _fit_unit(job, unit, fmt)
    records = _protect_records(fmt.read(unit), generator, label_of, job, tally)
    fmt.write_part(unit, records, job.part_path(unit), Path(job.dest))
    return {
        "unit": unit.index,
        "output": unit.output,
        "records": unit.count,
        "written": tally.written,
        "copied": tally.copied,
        "failed": tally.failed,
        "max_levels": tally.max_levels,
        "seconds": round(time.perf_counter() - started, 3),
    }


LabelOf = Callable[[Record, int], Optional[int]]


def _label_from_classes(job: JobSpec) -> LabelOf:
    classes = list(job.classes or ())
    index = {name: i for i, name in enumerate(classes)}

    def label_of(record: Record, position: int) -> int | None:
        if not classes:
            return None
        if record.label is None:
            raise ValueError(f"no label, and {job.method} noise is fitted per class ({len(classes)} classes)")
        if record.label not in index:
            shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            raise ValueError(f"label {record.label!r} is not one of the classes the protector was fitted on ({shown})")
        return index[record.label]

    return label_of


def _fit_unit(job: JobSpec, unit: Unit, fmt: ExportFormat) -> tuple[Generator, LabelOf]:
    """Fit a fresh generator on the unit's own images (sample-wise methods optimise shard by shard)."""
    generator = new_generator(job, unit_seed(job.seed, unit.index))
    small, names = [], []
    for record, image, problem in decoded_records(fmt.read(unit), job):
        if image is not None and problem is None:
            small.append(working_tensor(image, generator.config.resolution))
            names.append(record.label)
    if not small:
        return generator, lambda record, position: None
    images = torch.stack(small)
    labels = _fit_labels(generator, images, names)
    generator.fit(images, labels)

    def label_of(record: Record, position: int) -> int | None:
        return None if labels is None else int(labels[position])

    return generator, label_of


def _protect_records(
    records: Iterable[Record], generator: Generator, label_of: LabelOf, job: JobSpec, tally: _Tally
) -> Iterator[tuple[Record, bytes | None]]:
    """The records in order, each with its protected image bytes (None when it has no image or
    failed), decoding at most :data:`CHUNK_IMAGES` images at a time."""
    pending: list[tuple[Record, LoadedImage | None, int | None, int]] = []
    images_pending = 0
    position = 0
    for record, image, problem in decoded_records(records, job):
        if problem is None and image is not None:
            try:
                label = label_of(record, position)
            except ValueError as exc:
                problem, image = str(exc), None
            else:
                pending.append((record, image, label, position))
                position += 1
                images_pending += 1
        if problem is not None:
            tally.fail(record.key, problem)
            pending.append((record, None, None, -1))
        elif image is None:
            tally.copied += 1
            pending.append((record, None, None, -1))
        if images_pending >= CHUNK_IMAGES:
            yield from _protect_chunk(pending, generator, job, tally)
            pending, images_pending = [], 0
    yield from _protect_chunk(pending, generator, job, tally)


def _records_batch(todo: list[tuple[Record, LoadedImage, int | None, int]], generator: Generator) -> Batch:
    resolution, device = generator.config.resolution, generator.device
    labels = [label for _, _, label, _ in todo]
    records = [record for record, *_ in todo]
    return Batch(
        images=torch.stack([working_tensor(image, resolution) for _, image, _, _ in todo]).float().div(255).to(device),
        labels=None if labels[0] is None else torch.tensor(labels, dtype=torch.long, device=device),
        indices=torch.tensor([position for *_, position in todo], dtype=torch.long, device=device),
        paths=[record.name or record.key for record in records],
        class_names=[record.label for record in records],
        captions=[record.caption for record in records],
    )


@torch.no_grad()
def _chunk_perturbations(
    todo: list[tuple[Record, LoadedImage, int | None, int]], generator: Generator, tally: _Tally
) -> dict[int, torch.Tensor]:
    """Bounded perturbations by position. A record the method refuses (e.g. no caption for a
    text-driven method) is failed by name and the others are still done."""
    if not todo:
        return {}
    try:
        bounded = bounded_perturbation(generator, _records_batch(todo, generator)).cpu()
        return {position: delta for (*_, position), delta in zip(todo, bounded)}
    except ConfigError as exc:
        if len(todo) == 1:
            tally.fail(todo[0][0].key, str(exc))
            return {}
    deltas: dict[int, torch.Tensor] = {}
    for item in todo:
        deltas.update(_chunk_perturbations([item], generator, tally))
    return deltas


def _protect_chunk(
    pending: list[tuple[Record, LoadedImage | None, int | None, int]], generator: Generator, job: JobSpec, tally: _Tally
) -> Iterator[tuple[Record, bytes | None]]:
    todo = [(record, image, label, position) for record, image, label, position in pending if image is not None]
    deltas = _chunk_perturbations(todo, generator, tally)
    for record, image, _, position in pending:
        if image is None or position not in deltas:
            yield record, None
            continue
        width, height = image.size
        protected = apply_perturbation_uint8(image.rgb, to_image_size(deltas[position], width, height), generator.config.eps)
        tally.written += 1
        tally.max_levels = max(tally.max_levels, int(np.abs(protected.astype(np.int16) - image.rgb).max(initial=0)))
        yield record, encode_image(protected, image.alpha, job.image_format, image.icc_profile)

"""The sources a job reads: one reader/writer pair per format, behind one small interface.

A format lists its records as *units* (contiguous slices, in source order), reads a unit's
records back, writes a unit's protected records as a *part*, and joins the parts of one output
file in order. Every non-image field and the record order are kept; a record whose image
failed is left out of the output (and reported), never written unprotected. An image folder is
one format among the others: ``protect run`` and ``protect batch`` read it with the same code.

What a format reads (docs/security.md): regular files and archive members of at most
``max_bytes`` bytes; files inside the source (for a manifest: inside its folder) unless
``allow_outside``; an archive that ends early is reported, never silently shortened.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import stat
import tarfile
import zipfile
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Iterable, Iterator

from protect.images import (
    DEFAULT_MAX_BYTES,
    IMAGE_SUFFIXES,
    FolderScan,
    ImageReadError,
    atomic_open,
    outside_reason,
    output_relpath,
    read_file,
    scan_folder,
    too_many_bytes,
)

#: the longest file name (one path component, in bytes) most file systems take
MAX_NAME_BYTES = 255


class FormatError(ValueError):
    """The source cannot be read as the requested format; the message says why."""


@dataclass
class ColumnOptions:
    """Where images, labels and captions are in manifests and tables."""

    image: str = "image"
    label: str | None = "label"
    caption: str | None = "caption"


@dataclass
class Record:
    """One source record. ``image`` is the encoded image (None for a record without one, which
    is passed through unchanged); ``error`` refuses the record before decoding; ``payload`` is
    what the format needs to write the record back. ``key`` names the record in messages (with
    the source's location); ``name`` names it within the export, wherever the export lies
    (what methods that key noise by image see, and the manifest's ``input``); ``output`` names
    its protected copy within DEST (the manifest's ``output``)."""

    key: str
    image: bytes | None
    label: str | None = None
    caption: str | None = None
    error: str | None = None
    payload: Any = None
    name: str = ""
    output: str = ""


@dataclass(frozen=True)
class Unit:
    """A contiguous slice of records that is protected, written and journalled as one.

    ``output`` is the output file its part belongs to ("" when records become loose files)."""

    index: int
    output: str
    count: int
    items: tuple = field(repr=False)


ProtectedRecords = Iterable[tuple[Record, bytes | None]]
#: records a part could not write: (record key, reason)
WriteFailures = list[tuple[str, str]]


class ExportFormat(ABC):
    """Reader and writer for one export layout. ``source`` is a file or folder; outputs keep
    their names relative to it."""

    name: ClassVar[str]
    #: whether parts are joined into output files (False: records are written straight to DEST)
    joins_parts: ClassVar[bool] = True
    #: where the source's labels come from, in words (for the record of a run)
    label_origin: ClassVar[str] = "label column"

    def __init__(
        self, source: Path, columns: ColumnOptions, image_suffix: str, *, keep_other_files: bool = True,
        max_bytes: int = DEFAULT_MAX_BYTES, allow_outside: bool = False,
    ) -> None:
        self.source = Path(source)
        self.columns = columns
        self.image_suffix = image_suffix
        self.keep_other_files = keep_other_files
        self.max_bytes = max_bytes
        self.allow_outside = allow_outside

    def nothing_found(self) -> str:
        """The usage error when the source has no records at all."""
        return f"no records found in {self.source} (read as {self.name})"

    def skipped(self) -> list[str]:
        """Files of the source that are neither protected nor copied (not images, and not kept)."""
        return []

    def files_read(self) -> Iterator[Path]:
        """Every file the job reads (for the check that DEST holds none of them)."""
        if self.source.is_file():
            yield self.source
        else:
            for path in self.source.rglob("*"):
                yield path

    @abstractmethod
    def units(self, unit_size: int) -> Iterator[Unit]:
        """The job's units in source order."""

    @abstractmethod
    def read(self, unit: Unit) -> Iterator[Record]:
        """The records of ``unit`` in order."""

    @abstractmethod
    def write_part(self, unit: Unit, records: ProtectedRecords, part: Path, dest: Path) -> WriteFailures:
        """Write ``unit``'s records, each with its protected image bytes (None: leave it out);
        returns the records that could not be written (named, with the reason)."""

    def join(self, output: str, parts: list[Path], dest: Path) -> None:
        """Join the parts of ``output``, in order, into ``dest / output`` atomically."""


# ----------------------------------------------------------------------------------------------
# archive member checks


def unsafe_member_reason(name: str) -> str | None:
    """Why an archive member name could escape the destination, or None when it is safe."""
    if not name or "\x00" in name:
        return "empty or NUL in name"
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(posix).parts:
        return "'..' in path"
    return None


def _write_file(target: Path, data: bytes) -> str | None:
    """Write ``data`` to ``target`` atomically; why it could not be written, or None."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(target, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        return f"cannot write {target} ({exc.strerror or exc})"
    return None


def _left_out(record: Record, protected: bytes | None) -> bool:
    """Whether a record is missing from the output: refused, unreadable, or its image failed."""
    return record.payload is None or (record.image is not None and protected is None)


def _refused(member: str, reason: str) -> str:
    return f"refused archive member {member!r}: {reason}"


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _with_suffix(name: str, suffix: str, taken: set[PurePosixPath]) -> str:
    return str(output_relpath(PurePosixPath(name), suffix, taken))


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _name_problem(relpath: PurePosixPath) -> str | None:
    longest = max((len(part.encode()) for part in relpath.parts), default=0)
    if longest > MAX_NAME_BYTES:
        return f"output name is {longest} bytes long; file systems take {MAX_NAME_BYTES}: rename the file"
    return None


# ----------------------------------------------------------------------------------------------
# ImageFolder trees


class ImageFolderFormat(ExportFormat):
    """A folder of images, one subfolder per class (or flat); other files are copied as they are
    (``keep_other_files``) or skipped and listed."""

    name = "imagefolder"
    joins_parts = False
    label_origin = "folders"

    @cached_property
    def scan(self) -> FolderScan:
        return scan_folder(self.source, allow_outside=self.allow_outside)

    def nothing_found(self) -> str:
        kinds = ", ".join(sorted(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES))
        return f"no images found in {self.source} (looked for: {kinds})"

    def skipped(self) -> list[str]:
        return [] if self.keep_other_files else [str(p) for p in self.scan.not_images]

    def files_read(self) -> Iterator[Path]:
        yield from (entry.path for entry in self.scan.entries)
        if self.keep_other_files:
            yield from self.scan.not_images

    def units(self, unit_size: int) -> Iterator[Unit]:
        scan = self.scan
        taken: set[PurePosixPath] = set()
        items = []
        for entry in scan.entries:
            out_rel = output_relpath(entry.relpath, self.image_suffix, taken)
            items.append((str(entry.relpath), str(out_rel), entry.label, entry.problem or _name_problem(out_rel)))
        index = -1
        for index, chunk in enumerate(_chunks(items, unit_size)):
            yield Unit(index, "", len(chunk), tuple(chunk))
        # Files copied unchanged (batch), and linked folders that were not entered (always reported).
        others = [
            (rel, None, None, scan.problems.get(path)) for path in scan.not_images if self.keep_other_files
            for rel in [path.relative_to(self.source).as_posix()]
        ]
        others += [(path.relative_to(self.source).as_posix(), None, None, reason) for path, reason in scan.refused]
        if others:
            yield Unit(index + 1, "", len(others), tuple(others))

    def read(self, unit: Unit) -> Iterator[Record]:
        for rel, out_rel, label, problem in unit.items:
            path = self.source / rel
            problem = problem or (None if self.allow_outside else outside_reason(path, self.source))
            if problem is not None:
                yield Record(str(path), None, label, error=problem)
                continue
            try:
                data = read_file(path, self.max_bytes)
            except ImageReadError as exc:
                yield Record(str(path), None, label, error=exc.reason)
                continue
            if out_rel is None:  # not an image: copied unchanged
                yield Record(str(path), None, payload=(rel, data), name=rel, output=rel)
            else:
                yield Record(str(path), data, label, payload=(out_rel, None), name=rel, output=out_rel)

    def write_part(self, unit: Unit, records: ProtectedRecords, part: Path, dest: Path) -> WriteFailures:
        failures: WriteFailures = []
        for record, protected in records:
            if _left_out(record, protected):
                continue
            out_rel, original = record.payload
            problem = _write_file(dest / out_rel, protected if record.image is not None else original)
            if problem:
                failures.append((record.key, problem))
        return failures


# ----------------------------------------------------------------------------------------------
# CSV / JSONL manifests


class _ManifestFormat(ExportFormat):
    """A manifest file whose rows name images by path (relative to the manifest's folder).

    Images inside that folder keep their relative path (with the output suffix); others go to
    ``external/<row>-<name>``. The output manifest has the same rows, fields and order, with the
    image column pointing at the protected copy."""

    def _rows(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def _write_rows(self, handle: io.TextIOBase, rows: Iterable[dict[str, Any]]) -> None:
        raise NotImplementedError

    def _header(self) -> list[str] | None:
        return None

    def _output_name(self, row_number: int, value: str, taken: set[PurePosixPath]) -> str:
        # Paths that leave the manifest's folder, or enter hidden folders (where job state lives), are renamed.
        if unsafe_member_reason(value) is None and not value.replace("\\", "/").startswith("."):
            return _with_suffix(PurePosixPath(value.replace("\\", "/")).as_posix(), self.image_suffix, taken)
        return _with_suffix(f"external/{row_number:08d}-{PurePosixPath(value).name}", self.image_suffix, taken)

    def units(self, unit_size: int) -> Iterator[Unit]:
        taken: set[PurePosixPath] = set()
        chunk: list[tuple[int, dict[str, Any], str | None]] = []
        index = 0
        for row_number, row in enumerate(self._rows(), start=1):
            value = row.get(self.columns.image)
            out = self._output_name(row_number, str(value), taken) if isinstance(value, str) and value else None
            chunk.append((row_number, row, out))
            if len(chunk) == unit_size:
                yield Unit(index, self.source.name, len(chunk), tuple(chunk))
                chunk, index = [], index + 1
        if chunk:
            yield Unit(index, self.source.name, len(chunk), tuple(chunk))

    def files_read(self) -> Iterator[Path]:
        yield self.source
        for row in self._rows():
            value = row.get(self.columns.image)
            if isinstance(value, str) and value:
                yield self.source.parent / value

    def _outside(self, path: Path, value: str) -> str | None:
        if self.allow_outside or outside_reason(path, self.source.parent) is None:
            return None
        return f"{value!r} is outside {self.source.parent}, the manifest's folder; pass --allow-outside to read it"

    def read(self, unit: Unit) -> Iterator[Record]:
        base = self.source.parent
        for row_number, row, out in unit.items:
            key = f"{self.source}:row {row_number}"
            label = _text(row.get(self.columns.label)) if self.columns.label else None
            caption = _text(row.get(self.columns.caption)) if self.columns.caption else None
            if out is None:
                yield Record(key, None, label, caption, error=f"no image path in column {self.columns.image!r}")
                continue
            value = str(row[self.columns.image])
            path = base / value
            problem = self._outside(path, value)
            if problem is not None:
                yield Record(f"{key} ({path})", None, label, caption, error=problem)
                continue
            try:
                data = read_file(path, self.max_bytes)
            except ImageReadError as exc:
                yield Record(f"{key} ({path})", None, label, caption, error=exc.reason)
                continue
            yield Record(f"{key} ({path})", data, label, caption, payload=(row, out), name=f"{self.source.name}:row {row_number}",
                         output=out)

    def write_part(self, unit: Unit, records: ProtectedRecords, part: Path, dest: Path) -> WriteFailures:
        rows, failures = [], []
        for record, protected in records:
            if _left_out(record, protected):
                continue
            row, out = record.payload
            problem = _write_file(dest / out, protected)
            if problem:
                failures.append((record.key, problem))
                continue
            rows.append({**row, self.columns.image: out})
        with atomic_open(part, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return failures

    def join(self, output: str, parts: list[Path], dest: Path) -> None:
        with atomic_open(dest / output, "w", encoding="utf-8", newline="") as handle:
            self._write_rows(handle, (json.loads(line) for part in parts for line in _lines(part)))


def _lines(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        yield from handle


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


class CsvFormat(_ManifestFormat):
    name = "csv"

    def _header(self) -> list[str]:
        with open(self.source, encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle), None)
        if not header:
            raise FormatError(f"{self.source}: empty CSV file, expected a header row")
        if self.columns.image not in header:
            raise FormatError(
                f"{self.source}: no image column {self.columns.image!r}; columns: {', '.join(header)} "
                "(choose one with --image-column)"
            )
        return header

    def _rows(self) -> Iterator[dict[str, Any]]:
        self._header()
        with open(self.source, encoding="utf-8", newline="") as handle:
            yield from csv.DictReader(handle)

    def _write_rows(self, handle: io.TextIOBase, rows: Iterable[dict[str, Any]]) -> None:
        writer = csv.DictWriter(handle, fieldnames=self._header(), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


class JsonlFormat(_ManifestFormat):
    name = "jsonl"

    def _rows(self) -> Iterator[dict[str, Any]]:
        with open(self.source, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FormatError(f"{self.source}: line {number} is not valid JSON ({exc})") from None
                if not isinstance(row, dict):
                    raise FormatError(f"{self.source}: line {number} is not a JSON object")
                yield row

    def _write_rows(self, handle: io.TextIOBase, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------
# WebDataset-style tar shards


LABEL_SUFFIXES = (".cls", ".label")
CAPTION_SUFFIXES = (".txt", ".caption")


def _shards(source: Path, suffix: str) -> list[tuple[Path, str]]:
    """(path, output name) of every shard: the source itself, or the files under it, sorted."""
    if source.is_file():
        return [(source, source.name)]
    found = sorted(p for p in source.rglob(f"*{suffix}") if p.is_file() and not p.name.startswith("."))
    if not found:
        raise FormatError(f"no {suffix} files found in {source}")
    return [(p, p.relative_to(source).as_posix()) for p in found]


class _ShardFormat(ExportFormat):
    """A format whose source is one shard file or a folder of them."""

    suffix: ClassVar[str]

    def files_read(self) -> Iterator[Path]:
        return (path for path, _ in _shards(self.source, self.suffix))


def _sample_key(name: str) -> str:
    """WebDataset groups members by path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def _tar_member_problem(info: tarfile.TarInfo, max_bytes: int) -> str | None:
    reason = unsafe_member_reason(info.name)
    if reason:
        return reason
    if info.size > max_bytes:
        return too_many_bytes(info.size, max_bytes)
    if info.issym():
        return f"symbolic link (to {info.linkname!r})"
    if info.islnk():
        return f"hard link (to {info.linkname!r})"
    if info.ischr() or info.isblk():
        return "device file"
    if info.isfifo():
        return "FIFO"
    if not (info.isfile() or info.isdir()):
        return "not a regular file"
    return None


class TarFormat(_ShardFormat):
    """WebDataset shards: uncompressed ``.tar`` files whose consecutive members sharing a key
    (``000123.jpg``, ``000123.cls``, ``000123.txt``) form one sample. The image member is
    protected (renamed to the output suffix); the other members are copied unchanged."""

    name = "tar"
    suffix = ".tar"
    label_origin = ".cls members"

    def units(self, unit_size: int) -> Iterator[Unit]:
        # A unit is a byte range of one shard (from the header of its first sample to that of
        # the next unit's), so the plan holds a few numbers per unit whatever the shard size.
        shards = _shards(self.source, ".tar")
        index = 0
        for path, output in shards:
            starts = [offset for _, _, offset, _ in self._samples(path, 0, None)]
            for first in range(0, len(starts), unit_size):
                end = starts[first + unit_size] if first + unit_size < len(starts) else None
                yield Unit(index, output, min(unit_size, len(starts) - first), (str(path), starts[first], end))
                index += 1

    def _samples(
        self, path: Path | str, start: int, end: int | None
    ) -> Iterator[tuple[str, list[tarfile.TarInfo], int, str | None]]:
        """(key, members, header offset, None) of each sample whose first header lies in
        [start, end); an archive that ends early or holds a bad header ends with
        ("", [], offset, what is wrong), so the samples it cut off are reported, not lost."""
        with open(path, "rb") as handle:
            handle.seek(start)
            try:
                archive = tarfile.open(fileobj=handle, mode="r:")
            except tarfile.ReadError as exc:
                if start == 0:
                    raise FormatError(f"{path}: not an uncompressed tar file ({exc}); decompress compressed shards first") from None
                yield "", [], start, f"the archive cannot be read from byte {start} on ({exc})"
                return
            key, members, offset = None, [], start
            while True:
                position = archive.offset
                try:
                    info = archive.next()
                except (tarfile.TarError, EOFError, OSError) as exc:
                    if members:
                        yield key, members, offset, None
                    yield "", [], position, f"the archive is truncated or corrupt at byte {position} ({exc}); what follows is lost"
                    return
                archive.members.clear()  # tarfile keeps every header it reads; we need none
                if info is None or (end is not None and info.offset >= end):
                    break
                if info.isdir():
                    continue
                member_key = _sample_key(info.name)
                if members and member_key != key:
                    yield key, members, offset, None
                    members = []
                if not members:
                    key, offset = member_key, info.offset
                members.append(info)
            if members:
                yield key, members, offset, None

    def read(self, unit: Unit) -> Iterator[Record]:
        path, start, end = unit.items
        with open(path, "rb") as handle:
            for key, members, offset, broken in self._samples(path, start, end):
                name = f"{path}:{key}"
                if broken is not None:
                    yield Record(f"{path}:byte {offset}", None, error=broken)
                    continue
                problems = [(info.name, _tar_member_problem(info, self.max_bytes)) for info in members]
                refused = [_refused(member, reason) for member, reason in problems if reason]
                if refused:
                    yield Record(name, None, error="; ".join(refused))
                    continue
                contents = []
                for info in members:
                    handle.seek(info.offset_data)
                    contents.append(handle.read(info.size))
                short = [(info, len(data)) for info, data in zip(members, contents) if len(data) != info.size]
                if short:
                    info, held = short[0]
                    yield Record(name, None, error=f"member {info.name!r} declares {info.size:,} bytes but the archive "
                                 f"holds {held:,} (truncated)")
                    continue
                yield self._record(name, f"{Path(path).name}:{key}", unit.output, tuple(members), contents)

    def _record(
        self, name: str, stable_name: str, output: str, members: tuple[tarfile.TarInfo, ...], contents: list[bytes]
    ) -> Record:
        images = [i for i, info in enumerate(members) if _is_image_name(info.name)]
        label = caption = None
        for info, data in zip(members, contents):
            suffix = info.name[len(_sample_key(info.name)) :].lower()
            if suffix in LABEL_SUFFIXES:
                label = data.decode("utf-8", "replace").strip()
            elif suffix in CAPTION_SUFFIXES:
                caption = data.decode("utf-8", "replace").strip()
        payload = (members, contents, images[0] if images else None)
        if len(images) > 1:
            names = ", ".join(members[i].name for i in images)
            return Record(name, None, label, caption, error=f"sample has {len(images)} image members ({names}); one per sample is supported")
        renamed = str(PurePosixPath(members[images[0]].name).with_suffix(self.image_suffix)) if images else ""
        return Record(name, contents[images[0]] if images else None, label, caption, payload=payload, name=stable_name,
                      output=f"{output}:{renamed}")

    def write_part(self, unit: Unit, records: ProtectedRecords, part: Path, dest: Path) -> WriteFailures:
        with atomic_open(part, "wb") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.GNU_FORMAT) as out:
            for record, protected in records:
                if _left_out(record, protected):
                    continue
                members, contents, image_at = record.payload
                for position, (info, data) in enumerate(zip(members, contents)):
                    member = copy.copy(info)
                    if position == image_at:
                        member.name = str(PurePosixPath(info.name).with_suffix(self.image_suffix))
                        data = protected
                    member.size = len(data)
                    out.addfile(member, io.BytesIO(data))
        return []

    def join(self, output: str, parts: list[Path], dest: Path) -> None:
        target = dest / output
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(target, "wb") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.GNU_FORMAT) as out:
            for part in parts:
                with tarfile.open(part, "r:") as archive:
                    for info in archive:
                        out.addfile(info, archive.extractfile(info))


# ----------------------------------------------------------------------------------------------
# zip archives


def _zip_member_problem(info: zipfile.ZipInfo, max_bytes: int) -> str | None:
    reason = unsafe_member_reason(info.filename)
    if reason:
        return reason
    if info.file_size > max_bytes:
        return too_many_bytes(info.file_size, max_bytes)
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind == stat.S_IFLNK:
        return "symbolic link"
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        return "device file"
    if kind in (stat.S_IFIFO, stat.S_IFSOCK):
        return "FIFO or socket"
    return None


class ZipFormat(_ShardFormat):
    """A zip archive; image members are protected (renamed to the output suffix), the others
    copied unchanged. Images inside first-level folders take the folder name as label."""

    name = "zip"
    suffix = ".zip"
    label_origin = "folders"

    def units(self, unit_size: int) -> Iterator[Unit]:
        shards = _shards(self.source, ".zip")
        index = 0
        for path, output in shards:
            for chunk in _chunks(self._members(path), unit_size):
                yield Unit(index, output, len(chunk), (str(path), tuple(chunk)))
                index += 1

    def _members(self, path: Path) -> list[tuple[zipfile.ZipInfo, str | None, str | None]]:
        try:
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise FormatError(f"{path}: not a readable zip archive ({exc})") from None
        image_names = [i.filename for i in infos if not i.is_dir() and _is_image_name(i.filename)]
        labelled = bool(image_names) and all(len(PurePosixPath(n).parts) >= 2 for n in image_names)
        taken: set[PurePosixPath] = set()
        members = []
        for info in infos:
            out = None
            if not info.is_dir() and _is_image_name(info.filename) and unsafe_member_reason(info.filename) is None:
                out = _with_suffix(info.filename, self.image_suffix, taken)
            label = PurePosixPath(info.filename).parts[0] if labelled and out else None
            members.append((info, out, label))
        return members

    def read(self, unit: Unit) -> Iterator[Record]:
        path, members = unit.items
        with zipfile.ZipFile(path) as archive:
            for info, out, label in members:
                name = f"{path}:{info.filename}"
                problem = _zip_member_problem(info, self.max_bytes)
                if problem:
                    yield Record(name, None, label, error=_refused(info.filename, problem))
                    continue
                try:
                    with archive.open(info) as member:
                        data = member.read(self.max_bytes + 1)  # a member may hold more than it declares
                except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, zlib.error) as exc:
                    yield Record(name, None, label, error=f"cannot be read from the archive ({exc})")
                    continue
                if len(data) > self.max_bytes:
                    yield Record(name, None, label, error=_refused(info.filename, too_many_bytes(len(data), self.max_bytes)))
                    continue
                yield Record(name, data if out else None, label, payload=(info, out, data), name=f"{Path(path).name}:{info.filename}",
                             output=f"{unit.output}:{out or info.filename}")

    def write_part(self, unit: Unit, records: ProtectedRecords, part: Path, dest: Path) -> WriteFailures:
        with atomic_open(part, "wb") as handle, zipfile.ZipFile(handle, "w") as out:
            for record, protected in records:
                if _left_out(record, protected):
                    continue
                info, out_name, original = record.payload
                member = copy.copy(info)
                if out_name is not None:
                    member.filename = out_name
                out.writestr(member, protected if out_name is not None else original)
        return []

    def join(self, output: str, parts: list[Path], dest: Path) -> None:
        target = dest / output
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(target, "wb") as handle, zipfile.ZipFile(handle, "w") as out:
            for part in parts:
                with zipfile.ZipFile(part) as archive:
                    for info in archive.infolist():
                        out.writestr(info, archive.read(info))


# ----------------------------------------------------------------------------------------------
# Parquet with an image-bytes column


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise FormatError("Parquet needs pyarrow: pip install 'protect[batch]'") from None
    return pyarrow, pyarrow.parquet


class ParquetFormat(_ShardFormat):
    """Parquet files with an image column holding encoded bytes, either plain binary or the
    ``{bytes, path}`` struct Hugging Face datasets export. One unit per row group; the schema
    (with its metadata) and the row groups are kept."""

    name = "parquet"
    suffix = ".parquet"

    def units(self, unit_size: int) -> Iterator[Unit]:
        _, pq = _pyarrow()
        shards = _shards(self.source, ".parquet")
        index = 0
        for path, output in shards:
            try:
                metadata = pq.ParquetFile(path).metadata
            except Exception as exc:  # pyarrow raises its own ArrowInvalid/ArrowIOError (and OSError)
                raise FormatError(f"{path}: not a readable Parquet file ({exc})") from None
            names = metadata.schema.to_arrow_schema().names
            if self.columns.image not in names:
                raise FormatError(
                    f"{path}: no image column {self.columns.image!r}; columns: {', '.join(names)} (choose one with --image-column)"
                )
            first_row = 0
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                yield Unit(index, output, rows, (str(path), group, first_row))
                index, first_row = index + 1, first_row + rows

    def read(self, unit: Unit) -> Iterator[Record]:
        _, pq = _pyarrow()
        path, group, first_row = unit.items
        try:
            rows = pq.ParquetFile(path).read_row_group(group).to_pylist()
        except Exception as exc:  # pyarrow's own errors: the row group is corrupt
            for offset in range(unit.count):
                yield Record(f"{path}:row {first_row + offset}", None, error=f"row group {group} cannot be read ({exc})")
            return
        for offset, row in enumerate(rows):
            name = f"{path}:row {first_row + offset}"
            cell = row.get(self.columns.image)
            data = cell.get("bytes") if isinstance(cell, dict) else cell
            label = _text(row.get(self.columns.label)) if self.columns.label else None
            caption = _text(row.get(self.columns.caption)) if self.columns.caption else None
            if not isinstance(data, (bytes, bytearray)):
                yield Record(name, None, label, caption, error=f"no image bytes in column {self.columns.image!r}")
                continue
            if len(data) > self.max_bytes:
                yield Record(name, None, label, caption, error=too_many_bytes(len(data), self.max_bytes))
                continue
            yield Record(name, bytes(data), label, caption, payload=row, name=f"{Path(path).name}:row {first_row + offset}",
                         output=f"{unit.output}:row {first_row + offset}")

    def _protected_row(self, row: dict[str, Any], protected: bytes) -> dict[str, Any]:
        cell = row[self.columns.image]
        if isinstance(cell, dict):
            path = cell.get("path")
            if path:
                path = str(PurePosixPath(path).with_suffix(self.image_suffix))
            cell = {**cell, "bytes": protected, "path": path}
        else:
            cell = protected
        return {**row, self.columns.image: cell}

    def write_part(self, unit: Unit, records: ProtectedRecords, part: Path, dest: Path) -> WriteFailures:
        pa, pq = _pyarrow()
        path = unit.items[0]
        schema = pq.ParquetFile(path).schema_arrow
        rows = [self._protected_row(r.payload, p) for r, p in records if not _left_out(r, p)]
        with atomic_open(part, "wb") as handle:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), handle)
        return []

    def join(self, output: str, parts: list[Path], dest: Path) -> None:
        _, pq = _pyarrow()
        source = self.source if self.source.is_file() else self.source / output
        schema = pq.ParquetFile(source).schema_arrow
        target = dest / output
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(target, "wb") as handle:
            with pq.ParquetWriter(handle, schema) as writer:
                for part in parts:
                    table = pq.read_table(part, schema=schema)
                    if table.num_rows:
                        writer.write_table(table)


FORMATS: dict[str, type[ExportFormat]] = {
    cls.name: cls for cls in (ImageFolderFormat, CsvFormat, JsonlFormat, TarFormat, ParquetFormat, ZipFormat)
}
_BY_SUFFIX = {".csv": "csv", ".jsonl": "jsonl", ".tar": "tar", ".parquet": "parquet", ".zip": "zip"}


def detect_format(source: Path) -> str:
    """The format of ``source``: by file suffix, or for a folder by the files it holds."""
    source = Path(source)
    if source.is_file():
        name = _BY_SUFFIX.get(source.suffix.lower())
        if name is None:
            raise FormatError(
                f"cannot tell the format of {source} from its suffix; pass --input-format ({', '.join(FORMATS)})"
            )
        return name
    if not source.is_dir():
        raise FormatError(f"source not found: {source}")
    for suffix in (".tar", ".parquet", ".zip"):
        if any(p.suffix.lower() == suffix for p in source.iterdir() if p.is_file()):
            return _BY_SUFFIX[suffix]
    return "imagefolder"


def open_format(name: str, source: Path, columns: ColumnOptions, image_suffix: str, **options: Any) -> ExportFormat:
    """The reader/writer of format ``name``; ``options``: keep_other_files, max_bytes, allow_outside."""
    if name not in FORMATS:
        raise FormatError(f"unknown input format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name](source, columns, image_suffix, **options)


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files an interrupted atomic write left under ``folder``
    (``.NAME.<32 hex>.tmp``, the names :func:`protect.images.atomic_open` uses)."""
    removed = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if _ATOMIC_TEMPORARY.match(name):
                os.unlink(os.path.join(dirpath, name))
                removed += 1
    return removed


_ATOMIC_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")

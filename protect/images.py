"""Reading and writing image folders without ever touching the originals.

Inputs are read recursively, EXIF orientation applied and any mode brought to 8-bit RGB (plus
an 8-bit alpha channel when the image has one). Outputs are written atomically: to a temporary
file in the destination folder, flushed to disk, then renamed over the final name.

What is read (docs/security.md): regular files only, each read once with a size cap, opened
without blocking (a FIFO named like an image cannot hang a job); in a folder, links that lead
outside it are refused unless the caller allows them.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold
# Bytes read from one file or archive member: an 89-Mpixel 16-bit RGB TIFF, uncompressed, fits.
DEFAULT_MAX_BYTES = 512 * 2**20

# Output formats: (Pillow format name, file suffix, lossless?, save options)
OUTPUT_FORMATS: dict[str, tuple[str, str, bool, dict]] = {
    "png": ("PNG", ".png", True, {"compress_level": 6}),
    "tiff": ("TIFF", ".tiff", True, {"compression": "tiff_lzw"}),
    "webp": ("WEBP", ".webp", True, {"lossless": True, "quality": 100}),
    "jpeg": ("JPEG", ".jpg", False, {"quality": 95}),
}


class ImageReadError(Exception):
    """An input file could not be used; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageEntry:
    """One input image: where it is, its path relative to the input root and its label;
    ``problem`` says why it will not be read (a link out of the folder, not a regular file)."""

    path: Path
    relpath: PurePosixPath
    label: str | None
    problem: str | None = None


@dataclass
class FolderScan:
    """The images found under a root, whether they carry ImageFolder labels, and what was
    skipped: files that are not images (``problems`` says which of them may not be read) and
    linked folders that were not entered (``refused``)."""

    root: Path
    entries: list[ImageEntry]
    labelled: bool
    classes: list[str]
    not_images: list[Path] = field(default_factory=list)
    problems: dict[Path, str] = field(default_factory=dict)
    refused: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class LoadedImage:
    """An image as the methods see it: uint8 HxWx3 RGB, optional uint8 HxW alpha."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    icc_profile: bytes | None
    sha256: str
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]


def outside_reason(path: Path, root: Path) -> str | None:
    """Why reading ``path`` would leave the folder ``root`` (it is, or passes through, a link to
    somewhere else), or None when its real path is inside ``root``."""
    real, base = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real == base or real.is_relative_to(base):
        return None
    return f"a link to {real}, outside {root}; pass --allow-outside to read it"


def scan_folder(root: Path, *, allow_outside: bool = False) -> FolderScan:
    """List the images under ``root`` recursively, sorted by relative path.

    The folder is labelled (ImageFolder layout) when every image sits inside a first-level
    subfolder; the subfolder name is then its label. Otherwise it is treated as unlabelled.
    Files whose suffix is not an image suffix are listed in ``not_images`` and left alone.
    Hidden files and folders are skipped. Links are followed while they stay inside ``root``
    (anywhere with ``allow_outside``); a link out of it, a broken link and anything that is not
    a regular file are listed with the reason they will not be read, and a linked folder that
    is not entered (outside, or a loop) is listed in ``refused``.
    """
    root = Path(root)
    images: list[tuple[PurePosixPath, Path]] = []
    scan = FolderScan(root=root, entries=[], labelled=False, classes=[])

    def visit(folder: Path, rel: PurePosixPath, chain: frozenset[str]) -> None:
        try:
            children = sorted(os.scandir(folder), key=lambda child: child.name)
        except OSError as exc:
            scan.refused.append((folder, f"cannot be listed ({exc.strerror or exc})"))
            return
        for child in children:
            if child.name.startswith("."):
                continue
            path, child_rel = Path(child.path), rel / child.name
            problem = None if allow_outside else outside_reason(path, root)
            if child.is_dir():  # follows links
                real = os.path.realpath(path)
                if problem is not None or real in chain:
                    scan.refused.append((path, problem or "a link back to a folder that contains it (a loop)"))
                else:
                    visit(path, child_rel, chain | {real})
                continue
            problem = problem or _not_a_file_reason(path)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append((child_rel, path))
            else:
                scan.not_images.append(path)
            if problem is not None:
                scan.problems[path] = problem

    visit(root, PurePosixPath(), frozenset({os.path.realpath(root)}))
    images.sort(key=lambda item: str(item[0]))
    scan.labelled = bool(images) and all(len(rel.parts) >= 2 for rel, _ in images)
    scan.entries = [
        ImageEntry(path, rel, rel.parts[0] if scan.labelled else None, scan.problems.get(path)) for rel, path in images
    ]
    scan.classes = sorted({e.label for e in scan.entries if e.label is not None})
    return scan


def _not_a_file_reason(path: Path) -> str | None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "cannot be read: broken link (its target does not exist)"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None if stat.S_ISREG(mode) else "not a regular file (a FIFO, socket or device): only files are read"


def read_file(path: Path | str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file, read once and at most ``max_bytes`` of them, or
    :class:`ImageReadError` naming it. Opened without blocking, so a FIFO cannot hang the
    caller; devices, sockets and FIFOs are refused after opening (no race with a rename)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageReadError(path, "cannot be read: file not found (broken link?)") from None
    except IsADirectoryError:
        raise ImageReadError(path, "cannot be read: it is a directory") from None
    except PermissionError:
        raise ImageReadError(path, "cannot be read: permission denied") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageReadError(path, "cannot be read: it is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ImageReadError(path, "not a regular file (a FIFO, socket or device): only files are read")
        if info.st_size > max_bytes:
            raise ImageReadError(path, too_many_bytes(info.st_size, max_bytes))
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ImageReadError(path, too_many_bytes(len(data), max_bytes))
    return data


def too_many_bytes(size: int, max_bytes: int) -> str:
    return f"too large: {size:,} bytes exceeds the limit of {max_bytes:,} (raise it with --max-bytes)"


def _sixteen_bit_to_rgb(image: Image.Image) -> np.ndarray:
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if values.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
    gray = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _to_rgb_alpha(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Bring any Pillow mode to uint8 RGB plus optional alpha, saying what was converted."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image).copy(), None, []
    if mode == "RGBA":
        arr = np.asarray(image)
        return arr[:, :, :3].copy(), arr[:, :, 3].copy(), []
    if mode in ("L", "1"):
        return np.asarray(image.convert("RGB")).copy(), None, []
    if mode in ("LA", "La", "RGBa", "PA"):
        arr = np.asarray(image.convert("RGBA"))
        return arr[:, :, :3].copy(), arr[:, :, 3].copy(), []
    if mode == "P":
        has_alpha = "transparency" in image.info
        arr = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
        note = "palette image expanded to RGB" + ("A" if has_alpha else "")
        return arr[:, :, :3].copy(), (arr[:, :, 3].copy() if has_alpha else None), [note]
    if mode == "CMYK":
        return np.asarray(image.convert("RGB")).copy(), None, ["CMYK image converted to RGB"]
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_rgb(image), None, [f"{mode} (high bit depth) image reduced to 8-bit RGB"]
    if mode in ("YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB")).copy(), None, [f"{mode} image converted to RGB"]
    raise ValueError(f"unsupported pixel mode {mode!r}")


_PILLOW_LIMIT_LOCK = threading.Lock()


def _open_with_limit(data: bytes, max_pixels: int) -> Image.Image:
    """``Image.open`` with Pillow's own bomb guard raised to ``max_pixels`` when that is higher.

    Pillow refuses images over ``Image.MAX_IMAGE_PIXELS`` inside ``open`` (warning, or error over
    twice it), before our check can run; without this, ``--max-pixels`` could only lower the limit."""
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        if saved is not None and max_pixels > saved:
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def load_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> LoadedImage:
    """Decode one image file fully, or raise :class:`ImageReadError` naming it and the reason."""
    path = Path(path)
    return decode_image(read_file(path, max_bytes), path, max_pixels)


def decode_image(data: bytes, name: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode encoded image bytes (a file's, an archive member's, a table cell's) fully, or raise
    :class:`ImageReadError` naming ``name`` and the reason."""
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    # Hash and decode the same bytes, so the manifest describes exactly what was protected.
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open_with_limit(data, max_pixels) as image:
                if image.format not in ACCEPTED_FORMATS:
                    raise ImageReadError(name, f"unsupported image format {image.format}")
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageReadError(
                        name,
                        f"too large: {width}x{height} = {width * height:,} pixels exceeds the limit of "
                        f"{max_pixels:,} (possible decompression bomb; raise it with --max-pixels)",
                    )
                frames = getattr(image, "n_frames", 1)
                image.load()
                icc = image.info.get("icc_profile")
                upright = ImageOps.exif_transpose(image)
                rgb, alpha, notes = _to_rgb_alpha(upright)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(name, "not a recognised image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(name, f"too large (possible decompression bomb): {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(name, f"truncated or corrupt image data ({exc})") from None
    if frames > 1:
        # The first frame is what every viewer shows and what a scraper keeps (for MPO, a camera
        # JPEG with previews or depth maps, the main picture); the copy is that one image.
        notes.append(f"{frames} frames (animated or multi-page): the first is protected and written; the other "
                     f"{frames - 1} are not in the copy")
    if "CMYK image converted to RGB" in notes:
        icc = None  # a CMYK profile does not describe the RGB pixels we write
    return LoadedImage(rgb=rgb, alpha=alpha, icc_profile=icc, sha256=digest, notes=notes)


def output_relpath(relpath: PurePosixPath, suffix: str, taken: set[PurePosixPath]) -> PurePosixPath:
    """The output path for an input: same folders and stem, new suffix; never a clash.

    ``a.jpg`` and ``a.png`` in one folder would both become ``a.png``; the later one keeps its
    full name instead (``a.png.png``)."""
    candidate = relpath.with_suffix(suffix)
    if candidate in taken:
        candidate = relpath.with_name(relpath.name + suffix)
    taken.add(candidate)
    return candidate


@contextmanager
def atomic_open(path: Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success flush it to disk and rename it over
    ``path``, so ``path`` is either absent, the old file, or the complete new one. The temporary
    name keeps at most 100 bytes of the final one, so any name the file system takes is written."""
    stem = path.name.encode()[:100].decode("utf-8", "ignore")
    tmp = path.with_name(f".{stem}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _encode_to(
    handle: IO[bytes], rgb: np.ndarray, alpha: np.ndarray | None, fmt: str, icc_profile: bytes | None
) -> None:
    pil_format, _, _, options = OUTPUT_FORMATS[fmt]
    if alpha is not None and pil_format != "JPEG":
        image = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    else:
        image = Image.fromarray(rgb, mode="RGB")
    save_options = dict(options)
    if icc_profile:
        save_options["icc_profile"] = icc_profile
    image.save(handle, format=pil_format, **save_options)


def encode_image(rgb: np.ndarray, alpha: np.ndarray | None, fmt: str, icc_profile: bytes | None = None) -> bytes:
    """The bytes :func:`save_image_atomic` would write, for outputs that are not plain files
    (archive members, table cells)."""
    buffer = io.BytesIO()
    _encode_to(buffer, rgb, alpha, fmt, icc_profile)
    return buffer.getvalue()


def save_image_atomic(
    path: Path, rgb: np.ndarray, alpha: np.ndarray | None, fmt: str, icc_profile: bytes | None = None
) -> None:
    """Encode and write an image so that ``path`` is either absent or complete, never partial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as handle:
        _encode_to(handle, rgb, alpha, fmt, icc_profile)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file atomically (temporary file + rename)."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()

"""Reading inputs: every bad file becomes an ImageReadError naming it; every odd mode loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import (
    BAD_MAKERS,
    make_bomb_png,
    make_broken_symlink,
    make_empty_png,
    make_text_as_jpeg,
    make_truncated_jpeg,
    synthetic_rgb,
    write_exif_rotated_jpeg,
    write_image,
)
from protect.images import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    load_image,
    output_relpath,
    save_image_atomic,
    scan_folder,
)


@pytest.mark.parametrize("kind", sorted(BAD_MAKERS))
def test_bad_input_raises_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = BAD_MAKERS[kind](tmp_path)
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    assert path.name in str(info.value)
    assert info.value.path == path
    assert info.value.reason  # a human-readable reason, also shown without the path


def test_reasons_say_what_is_wrong(tmp_path: Path) -> None:
    expectations = {
        make_truncated_jpeg: "truncated",
        make_empty_png: "empty",
        make_text_as_jpeg: "not a recognised image",
        make_bomb_png: "decompression bomb",
        make_broken_symlink: "not found",
    }
    for maker, words in expectations.items():
        with pytest.raises(ImageReadError, match=words):
            load_image(maker(tmp_path))


def test_max_pixels_limit_refuses_large_images(tmp_path: Path) -> None:
    path = write_image(tmp_path / "big.png", 40, 30, seed=0)
    with pytest.raises(ImageReadError, match="too large") as info:
        load_image(path, max_pixels=40 * 30 - 1)
    assert "big.png" in str(info.value)
    assert "--max-pixels" in str(info.value)
    assert load_image(path, max_pixels=40 * 30).size == (40, 30)


def test_default_limit_is_pillows() -> None:
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS


@pytest.mark.parametrize("pillow_limit", [1000, 500])  # 1200 px is over Pillow's limit / over twice it
def test_max_pixels_can_raise_pillows_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pillow_limit: int) -> None:
    """--max-pixels above Pillow's own guard must let larger images through (scaled down here:
    Pillow's limit is lowered instead of decoding a 90-megapixel image)."""
    path = write_image(tmp_path / "wide.png", 40, 30, seed=0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    with pytest.raises(ImageReadError, match="too large"):
        load_image(path, max_pixels=pillow_limit)
    assert load_image(path, max_pixels=5000).size == (40, 30)
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # Pillow's global is left as it was


def test_directory_named_like_an_image(tmp_path: Path) -> None:
    path = tmp_path / "folder.png"
    path.mkdir()
    with pytest.raises(ImageReadError, match="directory"):
        load_image(path)


# ----------------------------------------------------------------------------------------------
# Modes that must load and be converted to uint8 RGB (+ alpha).


def test_rgb_png_round_trip(tmp_path: Path) -> None:
    rgb = synthetic_rgb(20, 28, seed=3)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (28, 20, 3)
    assert np.array_equal(loaded.rgb, rgb)
    assert loaded.alpha is None
    assert loaded.size == (20, 28)
    assert loaded.notes == []


def test_sha256_is_of_the_file_bytes(tmp_path: Path) -> None:
    import hashlib

    path = write_image(tmp_path / "a.jpg", 20, 28, seed=0)
    assert load_image(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_cmyk_jpeg_converted(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (12, 8), (10, 20, 30, 40)).save(path, quality=95)
    loaded = load_image(path)
    assert loaded.rgb.shape == (8, 12, 3) and loaded.rgb.dtype == np.uint8
    assert loaded.alpha is None
    assert loaded.icc_profile is None
    assert any("CMYK" in note for note in loaded.notes)
    expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(loaded.rgb, expected)


def test_sixteen_bit_grayscale_png(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 20 * 10).round().astype(np.uint16).reshape(10, 20)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file
    loaded = load_image(path)
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (10, 20, 3)
    expected = values.astype(np.float64) / 257.0
    assert np.abs(loaded.rgb[:, :, 0].astype(np.float64) - expected).max() <= 0.5 + 1e-9
    assert np.array_equal(loaded.rgb[:, :, 0], loaded.rgb[:, :, 1])
    assert np.array_equal(loaded.rgb[:, :, 0], loaded.rgb[:, :, 2])
    # A dark 16-bit image must not be mistaken for an 8-bit one.
    dark = np.full((4, 4), 200, dtype=np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert load_image(tmp_path / "dark16.png").rgb.max() <= 1


def _palette_image() -> Image.Image:
    image = Image.new("P", (10, 6))
    image.putpalette([(i * 7) % 256 for i in range(768)])
    for x in range(10):
        for y in range(6):
            image.putpixel((x, y), (x + y) % 4)
    return image


def test_palette_png_without_transparency(tmp_path: Path) -> None:
    image = _palette_image()
    image.save(tmp_path / "p.png")
    loaded = load_image(tmp_path / "p.png")
    assert loaded.alpha is None
    assert np.array_equal(loaded.rgb, np.asarray(image.convert("RGB")))


def test_palette_png_with_transparency_keeps_alpha(tmp_path: Path) -> None:
    image = _palette_image()
    image.save(tmp_path / "pt.png", transparency=0)
    loaded = load_image(tmp_path / "pt.png")
    assert loaded.alpha is not None and loaded.alpha.shape == (6, 10)
    index = np.asarray(image)
    assert np.array_equal(loaded.alpha == 0, index == 0)
    assert (loaded.alpha[index != 0] == 255).all()
    assert np.array_equal(loaded.rgb, np.asarray(image.convert("RGBA"))[:, :, :3])


def test_la_png(tmp_path: Path) -> None:
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    alpha = np.arange(30, dtype=np.uint8).reshape(5, 6)[::-1] * 5
    Image.fromarray(np.dstack([gray, alpha]), mode="LA").save(tmp_path / "la.png")
    loaded = load_image(tmp_path / "la.png")
    assert np.array_equal(loaded.rgb, np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(loaded.alpha, alpha)


def test_rgba_alpha_exact(tmp_path: Path) -> None:
    rgb = synthetic_rgb(20, 28, seed=5)
    alpha = np.random.default_rng(0).integers(0, 256, size=(28, 20), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(tmp_path / "rgba.png")
    loaded = load_image(tmp_path / "rgba.png")
    assert np.array_equal(loaded.rgb, rgb)
    assert np.array_equal(loaded.alpha, alpha)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    path = write_exif_rotated_jpeg(tmp_path / "rotated.jpg", 30, 20)
    loaded = load_image(path)
    assert loaded.size == (20, 30)  # transposed
    # Orientation 6: the stored left edge ends up at the top after rotating 90 degrees clockwise.
    top, bottom = loaded.rgb[:5].reshape(-1, 3).mean(0), loaded.rgb[-5:].reshape(-1, 3).mean(0)
    assert top[0] > top[2] and bottom[2] > bottom[0]


# ----------------------------------------------------------------------------------------------
# Writing


def test_save_image_atomic_leaves_no_temporaries(tmp_path: Path) -> None:
    rgb = synthetic_rgb(20, 28, seed=0)
    alpha = np.full((28, 20), 77, dtype=np.uint8)
    out = tmp_path / "deep" / "out.png"
    save_image_atomic(out, rgb, alpha, "png")
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.png"]
    loaded = load_image(out)
    assert np.array_equal(loaded.rgb, rgb) and np.array_equal(loaded.alpha, alpha)


def test_save_image_atomic_failure_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.png"
    save_image_atomic(out, synthetic_rgb(8, 8, seed=0), None, "png")
    before = out.read_bytes()

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image_atomic(out, synthetic_rgb(8, 8, seed=1), None, "png")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_output_relpath_never_clashes() -> None:
    from pathlib import PurePosixPath

    taken: set[PurePosixPath] = set()
    first = output_relpath(PurePosixPath("a/x.jpg"), ".png", taken)
    second = output_relpath(PurePosixPath("a/x.png"), ".png", taken)
    assert first == PurePosixPath("a/x.png")
    assert second != first and second.suffix == ".png"


# ----------------------------------------------------------------------------------------------
# Scanning folders


def test_scan_labelled_layout(make_images, tmp_path: Path) -> None:
    make_images("data", classes=("dog", "cat", "bird"), per_class=2)
    (tmp_path / "data" / "cat" / "notes.txt").write_text("hello")
    (tmp_path / "data" / "README").write_text("a file at the root, not an image")
    (tmp_path / "data" / "dog" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "data" / ".thumbs").mkdir()
    write_image(tmp_path / "data" / ".thumbs" / "t.png", 8, 8, seed=0)

    scan = scan_folder(tmp_path / "data")
    assert scan.labelled
    assert scan.classes == ["bird", "cat", "dog"]
    assert len(scan.entries) == 6
    assert [str(e.relpath) for e in scan.entries] == sorted(str(e.relpath) for e in scan.entries)
    assert all(e.label == e.relpath.parts[0] for e in scan.entries)
    assert sorted(p.name for p in scan.not_images) == ["README", "notes.txt"]
    names = {e.relpath.name for e in scan.entries}
    assert ".hidden.png" not in names and "t.png" not in names


def test_scan_flat_layout(make_images, tmp_path: Path) -> None:
    make_images("flat", classes=None, per_class=4)
    (tmp_path / "flat" / "list.csv").write_text("a,b\n")
    scan = scan_folder(tmp_path / "flat")
    assert not scan.labelled
    assert scan.classes == []
    assert len(scan.entries) == 4
    assert all(e.label is None for e in scan.entries)
    assert [p.name for p in scan.not_images] == ["list.csv"]


def test_scan_mixed_depth_is_unlabelled(make_images, tmp_path: Path) -> None:
    make_images("mixed", classes=("a", "b"), per_class=1)
    write_image(tmp_path / "mixed" / "loose.png", 8, 8, seed=0)
    scan = scan_folder(tmp_path / "mixed")
    assert not scan.labelled
    assert len(scan.entries) == 3


def test_scan_suffixes_case_insensitive(tmp_path: Path) -> None:
    write_image(tmp_path / "d" / "UPPER.PNG", 8, 8, seed=0)
    write_image(tmp_path / "d" / "photo.JPEG", 8, 8, seed=1)
    scan = scan_folder(tmp_path / "d")
    assert len(scan.entries) == 2 and scan.not_images == []


def test_bundled_samples_all_load() -> None:
    samples = Path(__file__).resolve().parents[1] / "samples"
    for folder, labelled in (("labelled", True), ("flat", False)):
        scan = scan_folder(samples / folder)
        assert scan.labelled is labelled
        assert scan.entries
        for entry in scan.entries:
            image = load_image(entry.path)
            assert image.rgb.dtype == np.uint8 and image.rgb.ndim == 3 and image.rgb.shape[2] == 3

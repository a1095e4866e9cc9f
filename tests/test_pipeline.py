"""protect_folder and `protect run`: outputs within budget, originals untouched, bad files
reported, usage errors refused, resume, determinism, config layering."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import protect.generator as generator_module
from conftest import BAD_MAKERS, synthetic_rgb, write_exif_rotated_jpeg, write_image
from protect.budget import budget_in_levels
from protect.cli import app
from protect.config import ConfigError, config_to_dict
from protect.generator import (
    Batch,
    available_methods,
    bounded_perturbation,
    create_generator,
    describe_fields,
    register,
    resolve_config,
)
from protect.hardware import device_description
from protect.images import load_image
from protect.methods.random_noise import RandomNoise
from protect.precision import resolved_precision
from protect.runner import MANIFEST_NAME, PROTECTION_NAME, STATE_DIR_NAME, UsageError, formats, protect_folder

METHODS = sorted(available_methods())
# Settings that keep every method fast on tiny inputs; each method takes the keys it has.
FAST_SETTINGS: dict[str, Any] = {
    "steps": 2, "max_rounds": 2, "resolution": 16, "train_steps": 2, "rounds": 2, "warmup_epochs": 1, "retrain_epochs": 1,
    # clusters: a tiny randomly initialised CLIP shipped with the package (no weights, no network)
    "epochs": 1, "surrogate_model": "protect-tiny-clip", "surrogate_weights": "random",
    "generator_width": 8, "generator_blocks": 1,
    # t2ue: an untrained generator over the same tiny CLIP's text embeddings
    "generator": "random",
}


def fast(method: str, **extra: Any) -> dict[str, Any]:
    keys = set(describe_fields(available_methods()[method].config_class))
    return {k: v for k, v in FAST_SETTINGS.items() if k in keys} | extra


def fast_cli(method: str, **extra: Any) -> list[str]:
    args: list[str] = []
    for key, value in fast(method, **extra).items():
        args += ["--set", f"{key}={value}"]
    return args


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: file contents hashed, links by target, folders by name."""
    result = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            result[rel] = "link->" + str(path.readlink())
        elif path.is_dir():
            result[rel] = "dir"
        else:
            result[rel] = sha256(path)
    return result


def read_manifest(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / MANIFEST_NAME).read_text(encoding="utf-8").splitlines()]


def output_images(output: Path) -> dict[str, bytes]:
    return {
        p.relative_to(output).as_posix(): p.read_bytes()
        for p in sorted(output.rglob("*"))
        if p.is_file() and STATE_DIR_NAME not in p.parts and p.name not in (MANIFEST_NAME, PROTECTION_NAME)
    }


def squash(text: str) -> str:
    """Whitespace-free text, so checks do not depend on how the terminal wrapped a line."""
    return "".join(text.split())


def mentions(output: str, text: str) -> bool:
    return squash(text) in squash(output)


def invoke(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def check_protected_copy(input_dir: Path, output_dir: Path, eps: float, *, expected: int) -> list[dict[str, Any]]:
    """Every readable input has a decodable output of its size within the budget, and a
    manifest record with the right hashes. Returns the manifest records."""
    records = read_manifest(output_dir)
    assert len(records) == expected
    assert len({r["input"] for r in records}) == expected
    levels = budget_in_levels(eps)
    changed = False
    for record in records:
        source, written = input_dir / record["input"], output_dir / record["output"]
        assert record["input_sha256"] == sha256(source)
        assert record["output_sha256"] == sha256(written)
        original, protected = load_image(source), load_image(written)
        assert protected.size == original.size
        assert list(original.size) == record["size"]
        diff = np.abs(protected.rgb.astype(np.int16) - original.rgb.astype(np.int16))
        assert diff.max() <= levels, f"{record['output']}: {diff.max()} levels > budget {levels}"
        changed |= bool(diff.any())
        assert written.suffix == ".png" and Image.open(written).format == "PNG"
    assert changed, "no output pixel differs from its original"
    assert not (output_dir / STATE_DIR_NAME).exists()
    # No stray temporaries from the atomic writes.
    assert not [p for p in output_dir.rglob("*.tmp")]
    return records


# ----------------------------------------------------------------------------------------------
# Every method, end to end


@pytest.mark.parametrize("method", METHODS)
def test_every_method_protects_a_labelled_folder(make_images, tmp_path: Path, method: str) -> None:
    inputs = make_images("input", classes=("cat", "dog"), per_class=3)
    source, output = tmp_path / "input", tmp_path / "output"
    before = snapshot(source)
    overrides = fast(method)

    summary = protect_folder(method, source, output, overrides=overrides, seed=3)

    assert summary.exit_code == 0 and summary.failed == []
    assert summary.written == len(inputs) and summary.already_done == 0
    config = resolve_config(method, overrides=overrides)
    assert 0 < summary.max_levels <= budget_in_levels(config.eps)
    assert summary.labels.startswith("folders")
    records = check_protected_copy(source, output, config.eps, expected=len(inputs))
    assert {r["label"] for r in records} == {"cat", "dog"}
    assert all(r["method"] == method and r["seed"] == 3 and r["eps"] == config.eps for r in records)
    assert {r["input"] for r in records} == {p.relative_to(source).as_posix() for p in inputs}

    document = json.loads((output / PROTECTION_NAME).read_text(encoding="utf-8"))
    assert document["method"] == method
    # the resolved config, with the defaults the method chose for this folder (never a key set by hand)
    chosen = {key: entry["value"] for key, entry in document["auto_settings"].items()}
    assert not set(chosen) & set(overrides)
    assert document["config"] == {**config_to_dict(config), **chosen}
    assert document["working_resolution"] == document["config"]["resolution"]
    assert document["seed"] == 3
    assert document["eps_levels"] == budget_in_levels(config.eps)
    assert document["hardware"] == device_description(torch.device("cpu"))
    assert document["precision"] == resolved_precision(torch.device("cpu"), config.precision)
    for package in ("python", "protect", "torch", "numpy", "pillow"):
        assert document["versions"][package]
    assert document["summary"]["written"] == len(inputs)
    assert document["summary"]["failed"] == []
    assert snapshot(source) == before


@pytest.mark.parametrize("method", METHODS)
def test_every_method_through_the_cli(make_images, tmp_path: Path, method: str) -> None:
    inputs = make_images("input", classes=("cat", "dog"), per_class=2)
    source, output = tmp_path / "input", tmp_path / "output"
    before = snapshot(source)

    result = invoke("run", method, source, output, *fast_cli(method), "--eps", "4/255")

    assert result.exit_code == 0, result.output
    assert mentions(result.output, "images written")
    check_protected_copy(source, output, 4 / 255, expected=len(inputs))
    document = json.loads((output / PROTECTION_NAME).read_text(encoding="utf-8"))
    assert document["config"]["eps"] == pytest.approx(4 / 255)
    assert document["eps_levels"] == 4
    assert snapshot(source) == before


@pytest.mark.parametrize("method", METHODS)
def test_generator_interface(method: str) -> None:
    """fit / perturb / bounded_perturbation / state_dict on tiny tensors, for every method."""
    config = resolve_config(method, overrides=fast(method))
    gen = torch.Generator().manual_seed(0)
    n, r = 6, config.resolution
    images = torch.randint(0, 256, (n, 3, r, r), generator=gen, dtype=torch.uint8)
    images[0] = 0
    images[1] = 255
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    first = create_generator(method, config, seed=1)
    first.fit(images, labels)
    names = [("cat", "dog")[int(label)] for label in labels]
    paths = [f"{name}/{i}.png" for i, name in enumerate(names)]
    batch = Batch(images=images.float().div(255), labels=labels, indices=torch.arange(n), paths=paths, class_names=names)
    with torch.no_grad():
        delta = bounded_perturbation(first, batch)
    assert delta.shape == (n, 3, r, r) and delta.dtype == torch.float32
    assert delta.abs().max() <= config.eps + 1e-6
    noisy = batch.images + delta
    assert noisy.min() >= -1e-6 and noisy.max() <= 1 + 1e-6
    assert delta.abs().max() > 0

    # A fresh generator restored from state_dict perturbs identically (what --resume relies on).
    second = create_generator(method, config, seed=1)
    second.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    with torch.no_grad():
        assert torch.equal(bounded_perturbation(second, batch), delta)


def test_methods_command_lists_every_method() -> None:
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    for method in METHODS:
        assert method in result.output


# ----------------------------------------------------------------------------------------------
# Alpha, EXIF orientation, odd modes


def test_alpha_kept_and_exif_rotation_applied(tmp_path: Path) -> None:
    source, output = tmp_path / "input", tmp_path / "output"
    (source / "a").mkdir(parents=True)
    (source / "b").mkdir(parents=True)
    rgb = synthetic_rgb(20, 28, seed=1)
    alpha = np.random.default_rng(1).integers(0, 256, size=(28, 20), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(source / "a" / "rgba.png")
    write_exif_rotated_jpeg(source / "a" / "rotated.jpg", 30, 20)
    palette = Image.new("P", (12, 10))
    palette.putpalette([(i * 5) % 256 for i in range(768)])
    for x in range(12):
        palette.putpixel((x, x % 10), 3)
    palette.save(source / "b" / "palette.png", transparency=0)
    Image.fromarray(np.full((10, 10, 2), 128, np.uint8), mode="LA").save(source / "b" / "la.png")
    write_image(source / "b" / "plain.png", 24, 24, seed=2)
    before = snapshot(source)

    summary = protect_folder("em-classwise", source, output, overrides=fast("em-classwise"))

    assert summary.exit_code == 0 and summary.written == 5
    check_protected_copy(source, output, 8 / 255, expected=5)

    out_rgba = Image.open(output / "a" / "rgba.png")
    assert out_rgba.mode == "RGBA"
    assert np.array_equal(np.asarray(out_rgba)[:, :, 3], alpha)

    rotated = Image.open(output / "a" / "rotated.png")
    assert rotated.size == (20, 30)  # stored 30x20 with orientation 6: upright is 20x30
    assert rotated.getexif().get(0x0112) in (None, 1)  # no orientation left to apply twice
    pixels = np.asarray(rotated.convert("RGB")).astype(int)
    top, bottom = pixels[:5].reshape(-1, 3).mean(0), pixels[-5:].reshape(-1, 3).mean(0)
    assert top[0] > top[2] + 100 and bottom[2] > bottom[0] + 100  # red on top, blue below

    out_palette = load_image(output / "b" / "palette.png")
    assert np.array_equal(out_palette.alpha, load_image(source / "b" / "palette.png").alpha)
    assert np.array_equal(load_image(output / "b" / "la.png").alpha, np.full((10, 10), 128, np.uint8))
    assert Image.open(output / "b" / "plain.png").mode == "RGB"
    assert snapshot(source) == before


# ----------------------------------------------------------------------------------------------
# Bad files: the job goes on


def make_mixed_folder(make_images, tmp_path: Path) -> tuple[Path, list[Path], list[Path], Path]:
    good = make_images("input", classes=("cat", "dog"), per_class=2)
    source = tmp_path / "input"
    bad = [maker(source / "cat") for _, maker in sorted(BAD_MAKERS.items())]
    notes = source / "dog" / "notes.txt"
    notes.write_text("not an image\n", encoding="utf-8")
    return source, good, bad, notes


@pytest.mark.parametrize("method", ["random", "em-classwise"])
def test_bad_files_are_reported_and_the_job_goes_on(make_images, tmp_path: Path, method: str) -> None:
    source, good, bad, notes = make_mixed_folder(make_images, tmp_path)
    output = tmp_path / "output"
    before = snapshot(source)

    summary = protect_folder(method, source, output, overrides=fast(method))

    assert summary.exit_code == 1
    assert summary.written == len(good)
    assert sorted(f.path for f in summary.failed) == sorted(str(p) for p in bad)
    assert all(f.reason for f in summary.failed)
    assert summary.not_images == [str(notes)]
    # A finished run never leaves the noise behind, failures or not.
    assert not (output / STATE_DIR_NAME).exists()
    records = read_manifest(output)
    assert sorted(r["input"] for r in records) == sorted(p.relative_to(source).as_posix() for p in good)
    for record in records:
        assert (output / record["output"]).exists()
    for path in bad:
        assert not (output / path.relative_to(source)).with_suffix(".png").exists()
    document = json.loads((output / PROTECTION_NAME).read_text(encoding="utf-8"))
    assert sorted(f["input"] for f in document["summary"]["failed"]) == sorted(str(p) for p in bad)
    assert document["summary"]["not_images"] == [str(notes)]
    assert snapshot(source) == before


def test_bad_files_through_the_cli(make_images, tmp_path: Path) -> None:
    source, good, bad, notes = make_mixed_folder(make_images, tmp_path)
    output = tmp_path / "output"
    before = snapshot(source)

    result = invoke("run", "random", source, output, *fast_cli("random"))

    assert result.exit_code == 1, result.output
    for path in bad:
        assert mentions(result.output, f"failed: {path}"), f"{path.name} not named as failed:\n{result.output}"
    assert mentions(result.output, f"{notes}: skipped")
    assert not mentions(result.output, f"failed: {notes}")
    assert len(read_manifest(output)) == len(good)
    assert snapshot(source) == before


def test_cli_prints_file_names_with_brackets_verbatim(make_images, tmp_path: Path) -> None:
    """Rich markup must not eat ``[x]`` in a file name: the user has to find the file."""
    make_images("input", per_class=1)
    source = tmp_path / "input"
    (source / "cat" / "photo[bold].png").write_bytes(b"")
    (source / "dog" / "notes[x].txt").write_text("not an image")
    result = invoke("run", "random", source, tmp_path / "output")
    assert result.exit_code == 1
    assert mentions(result.output, f"failed: {source / 'cat' / 'photo[bold].png'}")
    assert mentions(result.output, f"{source / 'dog' / 'notes[x].txt'}: skipped")


def test_folder_with_only_bad_images(tmp_path: Path) -> None:
    source, output = tmp_path / "input", tmp_path / "output"
    source.mkdir()
    bad = [BAD_MAKERS["zero-byte-png"](source), BAD_MAKERS["text-named-jpg"](source)]
    summary = protect_folder("random", source, output)
    assert summary.exit_code == 1 and summary.written == 0
    assert sorted(f.path for f in summary.failed) == sorted(str(p) for p in bad)
    assert (output / PROTECTION_NAME).exists()


# ----------------------------------------------------------------------------------------------
# Usage errors: exit 2, a clear message, nothing written


def _usage_cases(tmp_path: Path, source: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (CLI arguments after `run`, fragments the message must contain)."""
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("earlier work")
    out = tmp_path / "out"
    return {
        "output-inside-input": (["random", str(source), str(source / "protected")], ["inside the input folder"]),
        "output-is-input": (["random", str(source), str(source)], ["inside the input folder"]),
        "input-inside-output": (["random", str(source), str(tmp_path)], ["inside the output folder"]),
        "non-empty-output": (["random", str(source), str(nonempty)], ["not empty", "--resume", "--overwrite"]),
        "resume-and-overwrite": (["random", str(source), str(out), "--resume", "--overwrite"], ["exclude"]),
        "unknown-method": (["nope", str(source), str(out)], ["unknown method 'nope'", *METHODS]),
        "unknown-set-key": (
            ["em-samplewise", str(source), str(out), "--set", "stepz=3"],
            ["unknown key 'stepz'", "steps", "max_rounds", "eps"],
        ),
        "bad-set-syntax": (["random", str(source), str(out), "--set", "resolution"], ["key=value"]),
        "bad-set-type": (["random", str(source), str(out), "--set", "resolution=big"], ["resolution", "integer"]),
        "lossy-without-flag": (["random", str(source), str(out), "--format", "jpeg"], ["lossy", "--allow-lossy"]),
        "unknown-format": (["random", str(source), str(out), "--format", "gif"], ["gif", "png"]),
        "eps-too-large": (["random", str(source), str(out), "--eps", "2"], ["--eps", "8/255"]),
        "eps-not-a-number": (["random", str(source), str(out), "--eps", "lots"], ["--eps"]),
        "missing-input": (["random", str(tmp_path / "missing"), str(out)], ["not found", "missing"]),
    }


USAGE_CASES = [
    "output-inside-input", "output-is-input", "input-inside-output", "non-empty-output",
    "resume-and-overwrite", "unknown-method", "unknown-set-key", "bad-set-syntax", "bad-set-type",
    "lossy-without-flag", "unknown-format", "eps-too-large", "eps-not-a-number", "missing-input",
]


@pytest.mark.parametrize("case", USAGE_CASES)
def test_usage_errors_exit_2(make_images, tmp_path: Path, case: str) -> None:
    make_images("input", per_class=1)
    source = tmp_path / "input"
    args, fragments = _usage_cases(tmp_path, source)[case]
    before = snapshot(tmp_path)

    result = invoke("run", *args)

    assert result.exit_code == 2, result.output
    assert "Error" in result.output
    for fragment in fragments:
        assert mentions(result.output, fragment), f"{fragment!r} not in:\n{result.output}"
    assert snapshot(tmp_path) == before  # nothing written anywhere


def test_usage_errors_from_the_api(make_images, tmp_path: Path) -> None:
    make_images("input", per_class=1)
    source = tmp_path / "input"
    with pytest.raises(UsageError, match="inside the input folder"):
        protect_folder("random", source, source / "out")
    with pytest.raises(UsageError, match="available: bayes, clusters, em-classwise"):
        protect_folder("nope", source, tmp_path / "out")
    with pytest.raises(UsageError, match="valid keys"):
        protect_folder("random", source, tmp_path / "out", overrides={"steps": 2})
    with pytest.raises(UsageError, match="lossy"):
        protect_folder("random", source, tmp_path / "out", output_format="jpeg")
    with pytest.raises(UsageError, match="eps must be in"):
        protect_folder("random", source, tmp_path / "out", eps=2.0)
    with pytest.raises(UsageError, match="not found"):
        protect_folder("random", tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_input_folder_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "readme.txt").write_text("no images here")
    result = invoke("run", "random", tmp_path / "input", tmp_path / "out")
    assert result.exit_code == 2
    assert mentions(result.output, "no images found")


def test_one_class_folder_gets_pseudo_labels_for_methods_needing_labels(make_images, tmp_path: Path) -> None:
    inputs = make_images("input", classes=("only",), per_class=4)
    summary = protect_folder("em-classwise", tmp_path / "input", tmp_path / "out", overrides=fast("em-classwise", pseudo_label_k=2))
    assert summary.exit_code == 0 and summary.written == len(inputs)
    assert summary.labels.startswith("pseudo")
    assert {r["label"] for r in read_manifest(tmp_path / "out")} == {"only"}


def test_lossy_jpeg_with_allow_lossy_warns(make_images, tmp_path: Path) -> None:
    inputs = make_images("input", per_class=2)
    source, output = tmp_path / "input", tmp_path / "output"
    result = invoke("run", "random", source, output, "--format", "jpeg", "--allow-lossy", *fast_cli("random"))
    assert result.exit_code == 0, result.output
    assert mentions(result.output, "warning") and mentions(result.output, "weakens the protection")
    records = read_manifest(output)
    assert len(records) == len(inputs)
    for record in records:
        written = output / record["output"]
        assert written.suffix == ".jpg" and Image.open(written).format == "JPEG"
        assert load_image(written).size == load_image(source / record["input"]).size


@pytest.mark.parametrize("fmt", ["tiff", "webp"])
def test_other_lossless_formats_keep_the_budget(make_images, tmp_path: Path, fmt: str) -> None:
    make_images("input", per_class=1)
    source, output = tmp_path / "input", tmp_path / "output"
    summary = protect_folder("random", source, output, output_format=fmt, overrides=fast("random"))
    assert summary.exit_code == 0
    for record in read_manifest(output):
        original, protected = load_image(source / record["input"]), load_image(output / record["output"])
        assert np.abs(protected.rgb.astype(int) - original.rgb.astype(int)).max() <= 8


def test_overwrite_replaces_output(make_images, tmp_path: Path) -> None:
    make_images("input", per_class=1)
    source, output = tmp_path / "input", tmp_path / "output"
    protect_folder("random", source, output, seed=0)
    first = output_images(output)
    protect_folder("random", source, output, seed=1, overwrite=True)
    second = output_images(output)
    assert first.keys() == second.keys() and first != second


# ----------------------------------------------------------------------------------------------
# Unlabelled folders: pseudo-labels


def test_flat_folder_gets_pseudo_labels(make_images, tmp_path: Path) -> None:
    inputs = make_images("flat", classes=None, per_class=6)
    source, output = tmp_path / "flat", tmp_path / "output"
    from protect.progress import NullReporter

    reporter = NullReporter()
    summary = protect_folder(
        "em-classwise", source, output, overrides=fast("em-classwise", pseudo_label_k=2), reporter=reporter
    )

    assert summary.exit_code == 0 and summary.written == len(inputs)
    assert summary.labels.startswith("pseudo")
    assert any("pseudo-classes" in text for _, text in reporter.messages)
    records = check_protected_copy(source, output, 8 / 255, expected=len(inputs))
    assert all(r["label"] is None for r in records)
    assert {r["pseudo_label"] for r in records} <= {0, 1}
    assert all(isinstance(r["pseudo_label"], int) for r in records)
    document = json.loads((output / PROTECTION_NAME).read_text(encoding="utf-8"))
    assert document["labels"].startswith("pseudo")


def test_flat_folder_without_labels_for_random(make_images, tmp_path: Path) -> None:
    inputs = make_images("flat", classes=None, per_class=3)
    summary = protect_folder("random", tmp_path / "flat", tmp_path / "output")
    assert summary.labels == "none" and summary.written == len(inputs)
    assert all("pseudo_label" not in r for r in read_manifest(tmp_path / "output"))


# ----------------------------------------------------------------------------------------------
# Resume and determinism


class _Interrupt:
    """Wraps the atomic writer of output images and raises KeyboardInterrupt on its ``at``-th call."""

    def __init__(self, real, at: int) -> None:
        self.real, self.at, self.calls = real, at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_resume_after_interrupt_matches_an_uninterrupted_run(
    make_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    inputs = make_images("input", classes=("cat", "dog"), per_class=3)
    source = tmp_path / "input"
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    overrides = fast(method)

    protect_folder(method, source, whole, overrides=overrides, seed=5, unit_size=2)

    monkeypatch.setattr(formats, "atomic_open", _Interrupt(formats.atomic_open, at=3))
    with pytest.raises(KeyboardInterrupt):
        protect_folder(method, source, resumed, overrides=overrides, seed=5, unit_size=2)
    monkeypatch.undo()
    assert (resumed / STATE_DIR_NAME).exists()
    # What was written before the interruption is complete and listed; the fit is kept for --resume.
    assert len(output_images(resumed)) == 2 and len(read_manifest(resumed)) == 2
    # Without --resume a non-empty output is refused.
    with pytest.raises(UsageError, match="not empty"):
        protect_folder(method, source, resumed, overrides=overrides, seed=5, unit_size=2)

    summary = protect_folder(method, source, resumed, overrides=overrides, seed=5, unit_size=2, resume=True)

    assert summary.exit_code == 0
    assert summary.already_done == 2 and summary.written == len(inputs)
    assert output_images(resumed) == output_images(whole)
    key = lambda records: sorted(json.dumps(r, sort_keys=True) for r in records)  # noqa: E731
    assert key(read_manifest(resumed)) == key(read_manifest(whole))
    assert not (resumed / STATE_DIR_NAME).exists()


def test_resume_with_other_settings_is_refused(make_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_images("input", per_class=2)
    source, output = tmp_path / "input", tmp_path / "output"
    monkeypatch.setattr(formats, "atomic_open", _Interrupt(formats.atomic_open, at=2))
    with pytest.raises(KeyboardInterrupt):
        protect_folder("random", source, output, seed=1)
    monkeypatch.undo()
    with pytest.raises(UsageError, match="other settings"):
        protect_folder("random", source, output, seed=2, resume=True)


def test_resume_notices_changed_inputs(make_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = make_images("input", per_class=2)
    source, output = tmp_path / "input", tmp_path / "output"
    monkeypatch.setattr(formats, "atomic_open", _Interrupt(formats.atomic_open, at=2))
    with pytest.raises(KeyboardInterrupt):
        protect_folder("random", source, output)
    monkeypatch.undo()
    write_image(inputs[-1], 20, 28, seed=99)  # an input changed in between
    summary = protect_folder("random", source, output, resume=True)
    # The noise was fitted on the old version: that file fails by name, the others are written.
    assert summary.exit_code == 1 and summary.written == len(inputs) - 1
    assert [f.path for f in summary.failed] == [str(inputs[-1])] and "changed" in summary.failed[0].reason


def test_same_seed_same_bytes(make_images, tmp_path: Path) -> None:
    make_images("input", per_class=2)
    source = tmp_path / "input"
    overrides = fast("em-samplewise")
    protect_folder("em-samplewise", source, tmp_path / "a", overrides=overrides, seed=7)
    protect_folder("em-samplewise", source, tmp_path / "b", overrides=overrides, seed=7)
    protect_folder("em-samplewise", source, tmp_path / "c", overrides=overrides, seed=8)
    a, b, c = (output_images(tmp_path / name) for name in "abc")
    assert a == b
    assert a != c
    assert read_manifest(tmp_path / "a") == read_manifest(tmp_path / "b")


# ----------------------------------------------------------------------------------------------
# Config layering and the registry


def test_yaml_defaults() -> None:
    classwise, samplewise, random_ = (resolve_config(m) for m in ("em-classwise", "em-samplewise", "random"))
    assert classwise.steps == 1 and classwise.stop_error == 0.1
    assert samplewise.steps == 20 and samplewise.stop_error == 0.01
    for config in (classwise, samplewise, random_):
        assert config.eps == pytest.approx(8 / 255)
        assert config.resolution == 32
    assert samplewise.step_size == pytest.approx(0.8 / 255)


def test_layers_override_in_order(tmp_path: Path) -> None:
    extra = tmp_path / "mine.yaml"
    extra.write_text("steps: 7\ntrain_steps: 3\neps: 6/255\n", encoding="utf-8")
    from_file = resolve_config("em-samplewise", config_file=extra)
    assert (from_file.steps, from_file.train_steps, from_file.eps) == (7, 3, pytest.approx(6 / 255))
    assert from_file.max_rounds == 50  # untouched keys keep the YAML value

    overridden = resolve_config("em-samplewise", config_file=extra, overrides={"steps": 2, "eps": "4/255"})
    assert overridden.steps == 2 and overridden.train_steps == 3
    assert overridden.eps == pytest.approx(4 / 255)

    eps_wins = resolve_config("em-samplewise", config_file=extra, overrides={"eps": "4/255"}, eps=2 / 255)
    assert eps_wins.eps == pytest.approx(2 / 255)


def test_set_values_are_typed_like_yaml() -> None:
    from protect.config import parse_overrides

    overrides = parse_overrides(["steps=3", "eps=8/255", "surrogate=resnet18", "stop_error=0.2"])
    config = resolve_config("em-samplewise", overrides=overrides)
    assert config.steps == 3 and config.surrogate == "resnet18"
    assert config.eps == pytest.approx(8 / 255) and config.stop_error == pytest.approx(0.2)


def test_config_errors_name_key_and_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--set: unknown key 'stepz'; valid keys: .*steps"):
        resolve_config("em-samplewise", overrides={"stepz": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("resolutoin: 64\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml: unknown key 'resolutoin'"):
        resolve_config("random", config_file=bad)
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        resolve_config("em-samplewise", overrides={"steps": 2.5})
    with pytest.raises(ConfigError, match="surrogate must be one of"):
        resolve_config("em-samplewise", overrides={"surrogate": "vgg"})
    with pytest.raises(ConfigError, match="not found"):
        resolve_config("random", config_file=tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown method 'nope'; available: bayes, clusters, em-classwise, em-robust, em-robust-classwise, em-samplewise"):
        resolve_config("nope")


def test_every_method_has_a_yaml_with_only_known_keys() -> None:
    from protect.config import config_path_for, read_yaml

    for method, cls in available_methods().items():
        path = config_path_for(method)
        assert path.exists(), f"configs/{method}.yaml is missing"
        assert set(read_yaml(path)) <= set(describe_fields(cls.config_class))


def test_registering_a_name_twice_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generator_module, "_REGISTRY", dict(generator_module._REGISTRY))

    with pytest.raises(ValueError, match="'random' is already registered"):
        register("random")(type("AnotherRandom", (RandomNoise,), {}))

    register("test-only-noise")(type("First", (RandomNoise,), {}))
    with pytest.raises(ValueError, match="already registered"):
        register("test-only-noise")(type("Second", (RandomNoise,), {}))
    assert generator_module._REGISTRY["test-only-noise"].__name__ == "First"


def test_a_missing_default_config_is_an_error_naming_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dataclass defaults are not the documented defaults: a method whose YAML is missing
    (an incomplete install) must not run with them silently."""
    monkeypatch.setattr(generator_module, "_REGISTRY", dict(generator_module._REGISTRY))
    register("test-without-yaml")(type("NoYaml", (RandomNoise,), {}))
    with pytest.raises(ConfigError, match=r"default config test-without-yaml\.yaml not found"):
        resolve_config("test-without-yaml")

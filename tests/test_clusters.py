"""clusters (Unlearnable Clusters) and protect.models.clip: determinism, budget, the saved protector,
flat folders end to end, and the error for missing CLIP weights. A tiny randomly initialised
open_clip model stands in for CLIP; nothing touches the network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from typer.testing import CliRunner

from protect.cli import app
from protect.generator import Batch, bounded_perturbation, create_generator, resolve_config
from protect.images import load_image
from protect.models.clip import TINY_TEST_MODEL, ClipWeightsNotFound, load_clip
from protect.runner import MANIFEST_NAME, PROTECTION_NAME, UsageError, protect_export, protect_folder

TINY = {
    "surrogate_model": TINY_TEST_MODEL, "surrogate_weights": "random", "resolution": 16, "epochs": 2,
    "generator_width": 8, "generator_blocks": 1, "clusters": 3, "batch_size": 8,
}
TINY_CLI = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]


def tiny_generator(seed: int = 0, **extra):
    return create_generator("clusters", resolve_config("clusters", overrides=TINY | extra), seed=seed)


def random_images(n: int = 12, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def run_cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def max_change(source: Path, output: Path) -> int:
    worst = 0
    for record in (json.loads(line) for line in (output / MANIFEST_NAME).read_text().splitlines()):
        before = load_image(source / record["input"]).rgb.astype(int)
        after = load_image(output / record["output"]).rgb.astype(int)
        worst = max(worst, int(abs(after - before).max()))
    return worst


def test_clusters_and_perturbations_are_deterministic_for_a_seed() -> None:
    images = random_images()
    first, again, other = tiny_generator(seed=0), tiny_generator(seed=0), tiny_generator(seed=1)
    for generator in (first, again, other):
        generator.fit(images, None)
    assert torch.equal(first.centres, again.centres) and torch.equal(first.deltas, again.deltas)
    assert torch.equal(first.assign(first.features(images)), again.assign(again.features(images)))
    assert not torch.equal(first.deltas, other.deltas)


class _Unreadable(torch.Tensor):
    """Labels that fail the test when anything reads them."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"clusters read the labels ({func.__name__})")


def test_no_code_path_of_clusters_reads_labels() -> None:
    """Shuffled labels give identical noise, and labels that fail on any read are never read."""
    images, labels = random_images(), torch.arange(12) % 3
    shuffled, unreadable = tiny_generator(), tiny_generator()
    shuffled.fit(images, labels[torch.randperm(12, generator=torch.Generator().manual_seed(0))])
    unreadable.fit(images, labels.clone().as_subclass(_Unreadable))
    assert torch.equal(shuffled.deltas, unreadable.deltas) and torch.equal(shuffled.centres, unreadable.centres)


def test_each_perturbation_moves_features_toward_the_next_centre() -> None:
    """What the generators are trained for: x + delta_k looks like centre (k+1) mod K."""
    images = random_images(24)
    generator = tiny_generator(epochs=10, lr=1e-2, eps=16 / 255)
    generator.fit(images, None)
    clean = images.float().div(255)
    k = len(generator.centres)
    for cluster in range(k):
        goal = generator.centres[(cluster + 1) % k].softmax(-1).expand(len(clean), -1)
        before = F.kl_div(generator.features(clean).log_softmax(-1), goal, reduction="batchmean")
        after = F.kl_div(generator.features((clean + generator.deltas[cluster]).clamp(0, 1)).log_softmax(-1), goal,
                         reduction="batchmean")
        assert after < before


def test_budget_holds_after_rounding(make_images, tmp_path: Path) -> None:
    make_images("flat", classes=None, per_class=6)
    source, output = tmp_path / "flat", tmp_path / "out"
    summary = protect_folder("clusters", source, output, overrides=TINY, eps=8 / 255)
    assert summary.exit_code == 0 and summary.written == 6
    assert 0 < summary.max_levels <= 8 and max_change(source, output) <= 8
    generator = tiny_generator()
    generator.fit(random_images(), None)
    batch = Batch(random_images().float().div(255), None, torch.arange(12))
    assert bounded_perturbation(generator, batch).abs().max() <= 16 / 255 + 1e-6  # official default budget


def test_protector_round_trip_gives_identical_output(make_images, tmp_path: Path) -> None:
    make_images("flat", classes=None, per_class=6)
    make_images("later", classes=None, per_class=4, seed=7)
    saved = tmp_path / "protector"
    first = protect_folder("clusters", tmp_path / "flat", tmp_path / "out1", overrides=TINY, save_protector_to=saved)
    assert (saved / "protector.safetensors").exists() and json.loads((saved / "protector.json").read_text())["classes"] == []

    again = protect_folder("clusters", tmp_path / "flat", tmp_path / "out2", protector=saved)
    assert again.fit_seconds == 0
    for name in sorted(p.name for p in (tmp_path / "out1").glob("*.png")):
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()
    # New images are protected without fitting; the record names the protector, not a fit.
    later = protect_folder("clusters", tmp_path / "later", tmp_path / "out3", protector=saved)
    assert later.written == 4 and later.fit_seconds == 0 and first.fit_seconds > 0
    document = json.loads((tmp_path / "out3" / PROTECTION_NAME).read_text())
    assert "protector_sha256" in document["fit"] and document["config"]["surrogate_model"] == TINY_TEST_MODEL


def test_protector_refuses_another_surrogate() -> None:
    fitted = tiny_generator()
    fitted.fit(random_images(), None)
    state = fitted.state_dict()
    state["surrogate_fingerprint"] = state["surrogate_fingerprint"] + 1
    with pytest.raises(ValueError, match="not the one this protector was fitted with"):
        tiny_generator().load_state_dict(state)


def test_flat_unlabelled_folder_end_to_end_through_the_cli(make_images, tmp_path: Path) -> None:
    make_images("flat", classes=None, per_class=5)
    make_images("new", classes=None, per_class=3, seed=3)
    source, output, saved = tmp_path / "flat", tmp_path / "out", tmp_path / "keys"

    result = run_cli("run", "clusters", source, output, *TINY_CLI, "--eps", "8/255", "--save-protector", saved)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (output / MANIFEST_NAME).read_text().splitlines()]
    assert len(records) == 5 and all(r["label"] is None and "pseudo_label" not in r for r in records)
    assert json.loads((output / PROTECTION_NAME).read_text())["labels"] == "none"
    assert max_change(source, output) <= 8

    reused = run_cli("run", "clusters", tmp_path / "new", tmp_path / "new-out", "--protector", saved)
    assert reused.exit_code == 0, reused.output
    assert max_change(tmp_path / "new", tmp_path / "new-out") <= 8
    # A protector brings its own config.
    refused = run_cli("run", "clusters", tmp_path / "new", tmp_path / "x", "--protector", saved, "--eps", "4/255")
    assert refused.exit_code == 2 and "brings its own config" in refused.output


def test_protector_folder_inside_the_output_is_refused(make_images, tmp_path: Path) -> None:
    make_images("flat", classes=None, per_class=2)
    result = run_cli("run", "clusters", tmp_path / "flat", tmp_path / "out", *TINY_CLI,
                     "--save-protector", tmp_path / "out" / "keys")
    assert result.exit_code == 2 and "inside the output folder" in result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="cannot save a protector"):
        protect_folder("em-samplewise", tmp_path / "flat", tmp_path / "o", save_protector_to=tmp_path / "k")


def test_missing_clip_weights_say_what_to_download(make_images, tmp_path: Path) -> None:
    make_images("flat", classes=None, per_class=2)
    result = run_cli("run", "clusters", tmp_path / "flat", tmp_path / "out")
    assert result.exit_code == 2
    assert "huggingface.co/timm/resnet50_clip.openai/resolve/main/open_clip_model.safetensors" in result.output
    assert "surrogate_weights=PATH" in result.output
    missing = tmp_path / "ViT-B-32.safetensors"
    result = run_cli("run", "clusters", tmp_path / "flat", tmp_path / "out", "--set", "surrogate_model=ViT-B-32",
                     "--set", f"surrogate_weights={missing}")
    assert result.exit_code == 2
    assert f"CLIP weights file not found: {missing}" in result.output and "vit_base_patch32_clip_224.openai" in result.output
    with pytest.raises(ClipWeightsNotFound, match="HF_HUB_OFFLINE=1"):
        load_clip("ViT-B-16")


def test_clip_loads_local_weights_and_exposes_both_encoders(tmp_path: Path) -> None:
    source = load_clip(TINY_TEST_MODEL, weights="random", seed=5)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    loaded = load_clip(TINY_TEST_MODEL, weights=path, seed=99)
    images = torch.rand(3, 3, 20, 20)
    assert torch.equal(loaded.encode_image(images), source.encode_image(images))
    assert loaded.encode_image(images).shape == (3, 32)
    assert loaded.encode_text(["a photo of a cat", "a dog"]).shape == (2, 32)
    torch.save(source.model.state_dict(), tmp_path / "tiny.pt")
    assert torch.equal(load_clip(TINY_TEST_MODEL, weights=tmp_path / "tiny.pt").encode_image(images), source.encode_image(images))


def test_project_surrogate_weights_load(tmp_path: Path) -> None:
    """A small-cnn trained elsewhere (the CPU benchmark's surrogate) is a valid feature extractor."""
    from protect.surrogates import build_surrogate

    model = build_surrogate("small-cnn", 10, seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "cnn.safetensors"))
    generator = tiny_generator(surrogate="small-cnn", surrogate_weights=str(tmp_path / "cnn.safetensors"))
    images = random_images().float().div(255)
    assert torch.allclose(generator.features(images), model.eval().embed(images).detach(), atol=1e-5)
    with pytest.raises(Exception, match="surrogate_weights file not found"):
        tiny_generator(surrogate="small-cnn", surrogate_weights=str(tmp_path / "nope.pt"))


def test_batch_fits_one_protector_for_the_whole_export(make_images, tmp_path: Path) -> None:
    make_images("flat", classes=None, per_class=6)
    kept = tmp_path / "kept"
    summary = protect_export("clusters", tmp_path / "flat", tmp_path / "out", overrides=TINY, unit_size=2, workers=1,
                             save_protector_to=kept)
    assert summary.exit_code == 0 and summary.written == 6 and summary.units == 3
    assert summary.fit.startswith("once, on 6"), summary.fit  # not one protector per unit
    assert json.loads((kept / "protector.json").read_text())["fitted_on"] == 6
    for path in sorted((tmp_path / "flat").iterdir()):
        after = load_image(tmp_path / "out" / path.with_suffix(".png").name).rgb.astype(int)
        assert abs(after - load_image(path).rgb.astype(int)).max() <= 16

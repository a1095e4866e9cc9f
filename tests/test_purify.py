"""Diffusion purification: the purifier, its training, its cache and the verify countermeasure,
all offline with tiny randomly initialised UNets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attacks import purify as purify_module
from attacks.countermeasures import build_countermeasure
from attacks.purify import (
    PurifierError,
    PurifierTrainConfig,
    build_purifier_unet,
    export_purifier,
    load_purifier,
    purify,
    train_purifier,
)
from protect.cli import app
from protect.models.diffusion import build_ddpm_scheduler
from protect.runner import protect_folder
from tests.test_verify import _easy_set, _write_folder

pytest.importorskip("diffusers")

TINY = PurifierTrainConfig(channels=(8, 16), steps=4, batch_size=4, warmup=2, save_every=2)


@pytest.fixture(scope="module")
def tiny_purifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 32 px purifier in diffusers' save_pretrained layout."""
    folder = tmp_path_factory.mktemp("purifier")
    export_purifier(build_purifier_unet(TINY, 32, seed=0), build_ddpm_scheduler(), folder, {"trained_t_max": 999})
    return folder


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def test_purification_is_deterministic_keeps_shape_and_range_and_is_the_identity_at_t0(tiny_purifier: Path) -> None:
    purifier = load_purifier(tiny_purifier)
    images = _images(5)
    original = images.clone()
    first = purify(purifier, images, t_star=0.1, steps=3, seed=7, batch_size=2)
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, purify(purifier, images, t_star=0.1, steps=3, seed=7, batch_size=2))
    assert not torch.equal(first, purify(purifier, images, t_star=0.1, steps=3, seed=8, batch_size=2))
    assert not torch.equal(first, images)
    assert torch.equal(purify(purifier, images, t_star=0.0), images)
    assert torch.equal(images, original)


def test_a_saved_purifier_round_trips_through_the_diffusers_loader(tiny_purifier: Path) -> None:
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(tiny_purifier, local_files_only=True)
    ours = load_purifier(tiny_purifier)
    theirs = pipeline.unet.state_dict()
    assert all(torch.equal(value, theirs[name]) for name, value in ours.unet.state_dict().items())
    assert pipeline.scheduler.config.num_train_timesteps == ours.num_train_timesteps == 1000


def test_a_missing_or_incomplete_purifier_says_what_to_provide(tmp_path: Path, tiny_purifier: Path) -> None:
    with pytest.raises(PurifierError, match="purifier folder not found.*protect purifier train CLEAN_DIR OUT"):
        load_purifier(tmp_path / "nowhere")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    (tmp_path / "half" / "unet" / "config.json").write_text("{}")
    with pytest.raises(PurifierError, match="missing unet/diffusion_pytorch_model.safetensors, scheduler/scheduler_config.json"):
        load_purifier(tmp_path / "half")
    with pytest.raises(PurifierError, match="diffusion-purify needs a purifier"):
        build_countermeasure("diffusion-purify")


def test_training_resumes_to_the_same_purifier(tmp_path: Path) -> None:
    images = _images(8)
    straight = train_purifier(images, tmp_path / "straight", TINY, seed=1)
    assert straight["finished"] and straight["steps_done"] == 4
    stopped = train_purifier(images, tmp_path / "resumed", TINY, seed=1, minutes=0)
    assert not stopped["finished"] and stopped["steps_done"] == 1  # saved and stopped as soon as time ran out
    assert (tmp_path / "resumed" / "training.safetensors").exists()
    load_purifier(tmp_path / "resumed")  # usable half-way
    assert train_purifier(images, tmp_path / "resumed", TINY, seed=1)["finished"]
    assert not (tmp_path / "resumed" / "training.safetensors").exists()
    a, b = load_purifier(tmp_path / "straight").unet.state_dict(), load_purifier(tmp_path / "resumed").unet.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_verify_with_diffusion_purify_end_to_end_and_cached(tmp_path: Path, tiny_purifier: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _write_folder(tmp_path / "train", _easy_set(6, 0))
    _write_folder(tmp_path / "test", _easy_set(3, 1))
    protect_folder("random", tmp_path / "train", tmp_path / "prot")
    runner = CliRunner()
    base = ["verify", str(tmp_path / "prot"), "--clean-train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
            "--epochs", "1", "--seeds", "1", "--countermeasures", "diffusion-purify"]
    missing = runner.invoke(app, [*base, "--out", str(tmp_path / "r0")])
    assert missing.exit_code == 2 and "diffusion-purify needs a purifier" in missing.output and "--purifier OUT" in missing.output
    options = ["--purifier", str(tiny_purifier), "--purify-t", "0.1,0.2", "--purify-steps", "2"]
    calls = []
    real_purify = purify_module.purify
    monkeypatch.setattr(purify_module, "purify", lambda *a, **k: calls.append(len(a[1])) or real_purify(*a, **k))
    first = runner.invoke(app, [*base, *options, "--out", str(tmp_path / "r1")])
    assert first.exit_code == 0, first.output
    report = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert [row["countermeasure"] for row in report["rows"]] == ["diffusion-purify t*=0.1T", "diffusion-purify t*=0.2T"]
    assert all(set(row) >= {"clean", "control", "protected"} for row in report["rows"])
    assert (tmp_path / "r1" / "examples.png").exists()
    assert "the clean column is what purification costs" in (tmp_path / "r1" / "report.md").read_text()
    cached = sorted((tmp_path / "cache" / "protect" / "purified").glob("*.safetensors"))
    # each distinct training set (clean, control, protected) once per t*, plus the card's examples
    purified_sets = [n for n in calls if n == 12]
    assert len(purified_sets) == len(cached) >= 4 and len(calls) == len(cached) + 4
    calls.clear()
    again = runner.invoke(app, [*base, *options, "--out", str(tmp_path / "r2")])
    assert again.exit_code == 0 and again.output.count("taken from") == 6
    assert all(n != 12 for n in calls)
    assert sorted((tmp_path / "cache" / "protect" / "purified").glob("*.safetensors")) == cached


def test_purifier_train_command(tmp_path: Path) -> None:
    _write_folder(tmp_path / "clean", _easy_set(3, 0))
    (tmp_path / "clean" / "red" / "broken.png").write_bytes(b"not a png")
    runner = CliRunner()
    result = runner.invoke(app, ["purifier", "train", str(tmp_path / "clean"), str(tmp_path / "p"), "--steps", "2",
                                 "--batch-size", "2", "--channels", "8,16"])
    assert result.exit_code == 0, result.output
    assert "broken.png" in result.output and "finished" in result.output
    assert load_purifier(tmp_path / "p").trained_t_max == 249
    nothing = runner.invoke(app, ["purifier", "train", str(tmp_path / "none"), str(tmp_path / "q")])
    assert nothing.exit_code == 2 and "clean image folder not found" in nothing.output

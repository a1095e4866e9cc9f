"""The self-supervised surrogate of clusters (protect.models.ssl, `protect surrogate ssl`) and the
cluster report: training lowers NT-Xent and is reproducible and resumable, a saved encoder
round-trips and is refused when changed, clusters loads it, and cluster metrics appear only
when labels exist. Tiny models on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from protect.cli import app
from protect.cluster import cluster_quality
from protect.config import ConfigError
from protect.models.clip import TINY_TEST_MODEL
from protect.generator import create_generator, resolve_config
from protect.models.ssl import (
    SSLError,
    encode,
    encoder_files,
    load_encoder,
    nt_xent,
    simclr_views,
    train_config,
    train_encoder,
)
from protect.runner import PROTECTION_NAME, protect_folder

TINY_SSL = {"widths": [8, 8, 16], "projection_dim": 16, "epochs": 8, "batch_size": 16, "lr": 0.1, "resolution": 16}
TINY_CLUSTERS = {"surrogate_model": TINY_TEST_MODEL, "surrogate_weights": "random", "resolution": 16, "epochs": 1,
                 "generator_width": 8, "generator_blocks": 1, "clusters": 3, "batch_size": 8}


def blobs(n: int = 48, size: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 images with structure (a coloured square on a coloured ground) for SimCLR to tell apart."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 1, 1), generator=gen).expand(n, 3, size, size).clone()
    for i in range(n):
        top, left = torch.randint(0, size // 2, (2,), generator=gen).tolist()
        images[i, :, top : top + size // 2, left : left + size // 2] = torch.randint(0, 256, (3, 1, 1), generator=gen)
    return images.to(torch.uint8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("encoder")
    summary = train_encoder(blobs(), train_config(overrides=TINY_SSL), out, seed=0)
    return out, summary


def test_views_are_valid_and_differ_per_image() -> None:
    images = blobs(8)
    views = simclr_views(images, train_config(overrides=TINY_SSL), torch.Generator().manual_seed(0))
    assert views.shape == (8, 3, 16, 16) and views.dtype == torch.float32
    assert 0 <= float(views.min()) and float(views.max()) <= 1
    again = simclr_views(images, train_config(overrides=TINY_SSL), torch.Generator().manual_seed(1))
    assert not torch.allclose(views, again)
    # Matching views score better than mismatched ones.
    z = torch.randn(6, 4)
    assert nt_xent(z, z + 0.01 * torch.randn(6, 4), 0.5) < nt_xent(z, torch.randn(6, 4), 0.5)


def test_training_lowers_the_loss_and_is_reproducible(trained, tmp_path: Path) -> None:
    out, summary = trained
    assert summary.epoch_losses[-1] < summary.epoch_losses[0]
    again = train_encoder(blobs(), train_config(overrides=TINY_SSL), tmp_path / "again", seed=0)
    assert again.epoch_losses == summary.epoch_losses
    assert (tmp_path / "again" / "encoder.safetensors").read_bytes() == (out / "encoder.safetensors").read_bytes()


def test_interrupted_training_resumes_to_the_same_encoder(trained, tmp_path: Path) -> None:
    out, summary = trained

    def stop(epoch: int, loss: float) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_encoder(blobs(), train_config(overrides=TINY_SSL), tmp_path, seed=0, on_epoch=stop)
    resumed = train_encoder(blobs(), train_config(overrides=TINY_SSL), tmp_path, seed=0)
    assert resumed.resumed_from_epoch == 2 and resumed.epoch_losses == summary.epoch_losses
    assert (tmp_path / "encoder.safetensors").read_bytes() == (out / "encoder.safetensors").read_bytes()
    with pytest.raises(SSLError, match="another training"):
        train_encoder(blobs(seed=5), train_config(overrides=TINY_SSL), tmp_path, seed=0)


def test_saved_encoder_round_trips_and_is_refused_when_changed(trained, tmp_path: Path) -> None:
    out, _ = trained
    model = load_encoder(out / "encoder.safetensors")
    images = blobs(6)
    assert encode(model, images).shape == (6, 16)
    assert torch.equal(encode(load_encoder(out), images), encode(model, images))  # the folder works too
    record = json.loads((out / "encoder.json").read_text())
    assert record["architecture"]["feature_dim"] == 16 and record["trained_on"]["images"] == 48

    tampered = tmp_path / "tampered"
    tampered.mkdir()
    weights, description = encoder_files(tampered)
    data = bytearray((out / "encoder.safetensors").read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    description.write_text((out / "encoder.json").read_text())
    with pytest.raises(SSLError, match="SHA-256 differs"):
        load_encoder(tampered)
    with pytest.raises(SSLError, match="protect surrogate ssl"):
        load_encoder(tmp_path / "missing")


def test_clusters_uses_the_encoder_as_its_surrogate(trained) -> None:
    out, _ = trained
    generator = create_generator("clusters", resolve_config("clusters", overrides={
        **TINY_CLUSTERS, "surrogate": "ssl", "surrogate_weights": str(out / "encoder.safetensors")}))
    images = blobs(12)
    assert torch.allclose(generator.features(images), encode(load_encoder(out), images), atol=1e-5)
    unset = resolve_config("clusters", overrides={**TINY_CLUSTERS, "surrogate": "ssl", "surrogate_weights": ""})
    with pytest.raises(ConfigError, match="protect surrogate ssl"):
        create_generator("clusters", unset)


def test_cluster_metrics_only_when_the_folder_has_labels(make_images, tmp_path: Path) -> None:
    make_images("labelled", classes=["a", "b"], per_class=4)
    make_images("flat", classes=None, per_class=8)
    protect_folder("clusters", tmp_path / "labelled", tmp_path / "out-labelled", overrides=TINY_CLUSTERS)
    protect_folder("clusters", tmp_path / "flat", tmp_path / "out-flat", overrides=TINY_CLUSTERS)
    labelled = json.loads((tmp_path / "out-labelled" / PROTECTION_NAME).read_text())["fit"]
    flat = json.loads((tmp_path / "out-flat" / PROTECTION_NAME).read_text())["fit"]
    assert 0 <= labelled["cluster_quality"]["nmi"] <= 1 and 0.5 <= labelled["cluster_quality"]["purity"] <= 1
    assert sum(c["size"] for c in labelled["cluster_quality"]["clusters"]) == 8
    assert "cluster_quality" not in flat
    for fit in (labelled, flat):
        assert sum(fit["cluster_sizes"]) == 8 and len(fit["kl"]) == 3
        assert all({"start", "end", "clean", "hit_rate", "epochs"} <= set(k) for k in fit["kl"])


def test_cluster_quality_values() -> None:
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert cluster_quality(a, a) == {**cluster_quality(a, a), "purity": 1.0, "nmi": 1.0}
    assert cluster_quality(a, torch.tensor([1, 1, 0, 0, 2, 2]))["nmi"] == 1.0  # names do not matter
    independent = cluster_quality(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]))
    assert independent["nmi"] == 0.0 and independent["purity"] == 0.5
    # sklearn.metrics.normalized_mutual_info_score([0,0,0,1,1,1], [0,0,1,1,2,2]) = 0.5158
    assert cluster_quality(torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 2, 2]))["nmi"] == pytest.approx(0.5158, abs=1e-3)


def test_cli_trains_an_encoder_from_a_folder(make_images, tmp_path: Path) -> None:
    make_images("photos", classes=["x", "y"], per_class=6)
    settings = [a for k, v in TINY_SSL.items() for a in ("--set", f"{k}={v}".replace(" ", ""))]
    result = CliRunner().invoke(app, ["surrogate", "ssl", str(tmp_path / "photos"), str(tmp_path / "enc"), *settings,
                                      "--set", "epochs=1", "--set", "batch_size=4"])
    assert result.exit_code == 0, result.output
    assert "surrogate_weights=" in result.output and (tmp_path / "enc" / "encoder.safetensors").exists()
    bad = CliRunner().invoke(app, ["surrogate", "ssl", str(tmp_path / "photos"), str(tmp_path / "e2"), "--set", "nope=1"])
    assert bad.exit_code == 2 and "unknown key 'nope'" in bad.output

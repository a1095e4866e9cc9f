"""protect verify --relabel: victims trained with labels other than the protector's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attacks.data import ImageSet
from attacks.relabel import RelabelError, relabel_sets
from attacks.verify import Cell, VerifyError, load_verify_data, make_plan
from conftest import write_image
from protect.cli import app
from protect.runner import protect_folder

CLASSES = ["cat", "dog", "ship", "truck"]
COARSE = "groups:\n  animal: [cat, dog]\n  vehicle: [ship, truck]\n"


def four_class_set(n: int, seed: int) -> ImageSet:
    images = torch.randint(0, 256, (4 * n, 3, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return ImageSet(images, torch.arange(4).repeat_interleave(n), CLASSES, [""] * (4 * n))


def test_coarse_groups_relabel_every_set_alike(tmp_path: Path) -> None:
    mapping = tmp_path / "coarse.yaml"
    mapping.write_text(COARSE)
    clean, test = four_class_set(3, 0), four_class_set(2, 1)
    (new_clean, new_protected), new_test = relabel_sets(f"coarse:{mapping}", [clean, clean], test)
    assert new_clean.classes == ["animal", "vehicle"] == new_test.classes
    assert new_clean.labels.tolist() == [0] * 6 + [1] * 6 and torch.equal(new_protected.labels, new_clean.labels)
    assert new_test.labels.tolist() == [0] * 4 + [1] * 4
    mapping.write_text("groups:\n  animal: [cat]\n  vehicle: [ship, truck]\n")
    with pytest.raises(RelabelError, match="classes dog are in no group"):
        relabel_sets(f"coarse:{mapping}", [clean], test)


def test_kmeans_relabelling_is_deterministic_and_uses_no_class_names() -> None:
    clean, test = four_class_set(5, 0), four_class_set(2, 1)
    (first,), first_test = relabel_sets("kmeans:3", [clean], test, seed=0)
    (again,), again_test = relabel_sets("kmeans:3", [clean], test, seed=0)
    assert first.classes == ["cluster-0", "cluster-1", "cluster-2"]
    assert torch.equal(first.labels, again.labels) and torch.equal(first_test.labels, again_test.labels)
    assert set(first.labels.tolist()) == {0, 1, 2} and first_test.labels.max() < 3


def test_relabel_changes_cell_keys_but_true_labels_keep_theirs() -> None:
    cell = Cell("small-cnn", "none", (), "clean", 2, 0)
    assert make_plan("quick", relabel="true").relabel is None
    assert make_plan("quick", relabel="kmeans").relabel == "kmeans:10"
    assert Cell("small-cnn", "none", (), "clean", 2, 0, relabel="kmeans:10").key() != cell.key()
    with pytest.raises(VerifyError, match="choose true, coarse:FILE"):
        make_plan("quick", relabel="fine")
    with pytest.raises(VerifyError, match="mapping file not found"):
        make_plan("quick", relabel="coarse:/nowhere.yaml")


def test_verify_with_a_coarse_relabelling_reports_it(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(CLASSES):
            for i in range(n):
                write_image(tmp_path / split / name / f"{i}.png", 16, 16, seed=100 * c + i + (50 if split == "test" else 0))
    protect_folder("random", tmp_path / "train", tmp_path / "prot")
    mapping = tmp_path / "coarse.yaml"
    mapping.write_text(COARSE)
    data = load_verify_data(tmp_path / "prot", tmp_path / "train", tmp_path / "test", relabel=f"coarse:{mapping}")
    assert data.clean.classes == ["animal", "vehicle"] and "coarse groups" in data.labelling
    assert data.chance == 0.5
    uneven = tmp_path / "uneven.yaml"
    uneven.write_text("groups:\n  three: [cat, dog, ship]\n  one: [truck]\n")
    assert load_verify_data(tmp_path / "prot", tmp_path / "train", tmp_path / "test", relabel=f"coarse:{uneven}").chance == 0.75

    result = CliRunner().invoke(app, [
        "verify", str(tmp_path / "prot"), "--clean-train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
        "--countermeasures", "none", "--epochs", "1", "--seeds", "1", "--relabel", f"coarse:{mapping}",
        "--out", str(tmp_path / "report"),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["relabel"] == f"coarse:{mapping}" and "coarse groups" in report["labelling"]
    assert all(cell["cell"]["relabel"] == f"coarse:{mapping}" for cell in report["cells"])
    card = (tmp_path / "report" / "report.md").read_text()
    assert f"Labels used by the victims: coarse groups of the true classes from {mapping}" in card
    assert "Chance (always answering the most frequent test label) is 50.0%" in card
    bad = CliRunner().invoke(app, ["verify", str(tmp_path / "prot"), "--clean-train", str(tmp_path / "train"),
                                   "--test", str(tmp_path / "test"), "--relabel", "kmeans:one"])
    assert bad.exit_code == 2 and "integer K" in bad.output

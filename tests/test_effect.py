"""Real effect on real data: a victim trained on the protected copy does much worse on clean
test images than one trained on the originals, and worse than one trained on random noise of
the same budget.

Needs ../shared/data/cifar10 (skipped without it); the protected folders come from the
session fixture ``cifar_small``. Deselect with ``-m 'not slow'``.
"""

from __future__ import annotations

import json

import pytest

from attacks.data import load_image_folder
from attacks.train import TrainConfig, train_classifier
from protect.models import build_classifier

# Small batches and 15 epochs: the one-cycle schedule needs enough steps on 1,000 images.
VICTIM = TrainConfig(epochs=15, batch_size=100, lr=0.1)


@pytest.mark.slow
def test_protection_lowers_victim_accuracy(cifar_small: dict) -> None:
    for name in ("em", "random"):
        record = json.loads((cifar_small[name] / "protection.json").read_text())
        assert record["summary"]["written"] == 1000 and record["summary"]["max_abs_diff_levels"] <= 8

    train = {
        "clean": load_image_folder(cifar_small["clean"]),
        "em-classwise": load_image_folder(cifar_small["em"]),
        "random": load_image_folder(cifar_small["random"]),
    }
    classes = train["clean"].classes
    assert all(data.classes == classes and len(data) == 1000 for data in train.values())
    test = load_image_folder(cifar_small["test"], classes=classes)

    accuracy = {}
    for name, data in train.items():
        result = train_classifier(build_classifier("small-cnn", len(classes), seed=0), data, test, VICTIM, seed=0)
        accuracy[name] = result.final
        print(f"\n{name:>13}: clean test accuracy {result.final:.3f} "
              f"(per epoch {[round(a, 2) for a in result.test_accuracy]}, {result.seconds:.0f} s)")
    print(f"em-classwise fit: {cifar_small['em_fit_seconds']:.0f} s")

    assert accuracy["clean"] >= 0.40, "the clean victim must learn, or the gap below means nothing"
    assert accuracy["em-classwise"] <= accuracy["clean"] - 0.25
    assert accuracy["em-classwise"] < accuracy["random"]
    # Noise of the same size without the shortcut barely hurts: the drop is not the budget's doing.
    assert accuracy["random"] >= accuracy["clean"] - 0.10

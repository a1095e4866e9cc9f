"""Robust error-minimising noise (min-min-max with EOT): the inner maximisation, the
differentiable transformations against the countermeasures they stand for, and the marks the
protection card reads."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks.countermeasures import build_countermeasure
from attacks.train import random_crop_flip
from conftest import CIFAR10
from protect.config import config_to_dict
from protect.generator import create_generator, method_class, resolve_config
from protect.methods.em_robust import EOT_TRANSFORMS, draw_transforms, loss_maximising

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def cifar_images(n: int = 64) -> torch.Tensor:
    """Real photos for the codec comparison: the first CIFAR-10 test images of each class, uint8."""
    if not (CIFAR10 / "test").is_dir():
        pytest.skip("../shared/data/cifar10 not found: the JPEG comparison needs real images")
    from attacks.data import load_image_folder

    return load_image_folder(CIFAR10 / "test", per_class=max(1, n // 10)).images


def test_inner_maximisation_raises_the_loss_within_rho_a() -> None:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.rand(32, 3, 8, 8, generator=gen)
    y = torch.randint(0, 4, (32,), generator=gen)
    rho = 4 / 255
    adv = loss_maximising(model, x, y, radius=rho, steps=5, step_size=1 / 255, gen=gen, autocast=NO_AUTOCAST)
    assert (adv - x).abs().max() <= rho + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)
    assert torch.equal(loss_maximising(model, x, y, radius=0.0, steps=5, step_size=1 / 255, gen=gen, autocast=NO_AUTOCAST), x)


@pytest.mark.parametrize("name", ["jpeg", "grayscale", "blur", "augment"])
def test_eot_transforms_are_differentiable(name: str) -> None:
    transform = EOT_TRANSFORMS[name](jpeg_quality=[10, 10])
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = transform(x, torch.Generator().manual_seed(2))
    assert out.shape == x.shape
    (grad,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# Tolerances, in 8-bit levels (mean absolute difference over all pixels) against the
# countermeasure of `protect verify` that each transformation stands for. The differentiable
# JPEG rounds its DCT coefficients smoothly and keeps float pixels, so at quality 10 it differs
# from PIL's libjpeg by 3.3 levels on average on the first 200 CIFAR-10 test photos (measured),
# where the codec itself moves pixels by 13.1 levels; grayscale and blur differ by rounding only
# (0.16 and 0.25 levels measured).
@pytest.mark.parametrize("name, tolerance", [("jpeg", 4.0), ("grayscale", 0.5), ("blur", 0.5)])
def test_eot_transforms_match_the_countermeasures(name: str, tolerance: float) -> None:
    images = cifar_images()
    reference = build_countermeasure(name).data_transform(images, torch.Generator().manual_seed(0)).float()
    ours = EOT_TRANSFORMS[name](jpeg_quality=[10, 10])(images.float() / 255, torch.Generator().manual_seed(0)) * 255
    assert (ours - reference).abs().mean() <= tolerance
    if name == "jpeg":  # and JPEG really compresses: far from the original, near the codec
        assert (images.float() - reference).abs().mean() > 2 * tolerance


def test_eot_augment_is_the_victims_crop_and_flip() -> None:
    """Each output is one of the crops (pad 4, reflect) or flipped crops the victims train on."""
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    out = EOT_TRANSFORMS["augment"](jpeg_quality=[10, 10])(x, torch.Generator().manual_seed(4))
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    for i in range(len(x)):
        crops = [padded[i, :, dy:dy + 16, dx:dx + 16] for dy in range(9) for dx in range(9)]
        candidates = crops + [c.flip(-1) for c in crops]
        assert any(torch.allclose(out[i], c, atol=1e-6) for c in candidates)
    assert random_crop_flip(x, torch.Generator().manual_seed(0)).shape == out.shape


def test_each_image_draws_its_own_transformation() -> None:
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    transforms = [EOT_TRANSFORMS["none"](), EOT_TRANSFORMS["grayscale"]()]
    out = draw_transforms(transforms, x, torch.Generator().manual_seed(6))
    gray = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    untouched = (out == x).flatten(1).all(1)
    assert torch.equal(gray | untouched, torch.ones(64, dtype=torch.bool)) and 10 < int(gray.sum()) < 54


def test_designed_against_follows_the_config() -> None:
    def designed(method: str, **overrides) -> tuple[str, ...]:
        return method_class(method).designed_against(config_to_dict(resolve_config(method, overrides=overrides)))

    assert designed("em-robust", eot=["jpeg", "augment"], rho_a="4/255") == ("adv-training-4", "jpeg")
    assert designed("em-robust-classwise", eot=[], rho_a="8/255") == ("adv-training", "adv-training-4")
    assert designed("em-samplewise") == ()
    with pytest.raises(Exception, match="unknown eot transformation"):
        resolve_config("em-robust", overrides={"eot": ["sepia"]})


@pytest.mark.slow
def test_robust_noise_survives_jpeg_better_than_plain_noise() -> None:
    """On 500 real CIFAR-10 photos: a victim trained on JPEG-compressed (quality 10) protected
    data learns less from noise made through the differentiable JPEG than from plain
    sample-wise error-minimising noise."""
    if not (CIFAR10 / "train").is_dir():
        pytest.skip("../shared/data/cifar10 not found: the real-data test needs the shared CIFAR-10 folder")
    from attacks.data import ImageSet, load_image_folder
    from attacks.train import TrainConfig, train_classifier
    from protect.models import build_classifier
    from protect.budget import perturb_uint8
    from protect.generator import Batch, bounded_perturbation

    train = load_image_folder(CIFAR10 / "train", per_class=50)
    test = load_image_folder(CIFAR10 / "test", per_class=50, classes=train.classes)
    shared = {"batch_size": 100, "steps": 5, "step_size": "2/255"}

    def protected(method: str, **settings) -> ImageSet:
        generator = create_generator(method, resolve_config(method, overrides={**shared, **settings}), seed=0)
        generator.fit(train.images, train.labels)
        batch = Batch(images=train.images.float() / 255, labels=train.labels, indices=torch.arange(len(train)))
        return ImageSet(perturb_uint8(train.images, bounded_perturbation(generator, batch), 8 / 255), train.labels,
                        train.classes, train.paths)

    jpeg = build_countermeasure("jpeg").data_transform
    accuracy = {}
    for name, data in {
        # plain: the paper's loop (5 steps of 2/255 per pass); the robust noise leaves PGD below a
        # loss of 0.1, which keeps the test short
        "plain": protected("em-samplewise", fast=False),
        "robust": protected("em-robust", eot=["jpeg"], rho_a=0.0, atk_steps=0, stop_error=0.01, exit_loss=0.1),
    }.items():
        victim = build_classifier("small-cnn", 10, seed=0)
        accuracy[name] = train_classifier(victim, data, test, TrainConfig(epochs=12, batch_size=50, lr=0.1), seed=0,
                                          data_transform=jpeg).final
    print(f"\nJPEG-trained victim accuracy: {accuracy}")
    assert accuracy["robust"] < accuracy["plain"] - 0.03


@pytest.mark.parametrize("robust, plain", [("em-robust", "em-samplewise"), ("em-robust-classwise", "em-classwise")])
def test_settings_chosen_from_the_folder_follow_the_plain_method(robust: str, plain: str) -> None:
    """The same rules as the error-minimising counterpart; the class-wise step grows from the
    method's own default (REM's 1.6/255 at batch 512), so large folders keep it."""
    from protect.autoset import FolderFacts, choose_settings

    assert [s.key for s in method_class(robust).auto_settings] == [s.key for s in method_class(plain).auto_settings]
    config = config_to_dict(resolve_config(robust))
    for images in (50_000, 240):
        facts = FolderFacts(images=images, classes=10, side=224)
        sized, _ = choose_settings(method_class(robust).auto_settings, config, facts, (), from_size=True)
        chosen, _ = choose_settings(method_class(robust).auto_settings, sized, facts, (), from_size=False)
        assert chosen["resolution"] == 64
        if robust == "em-robust-classwise":
            assert chosen["batch_size"] == min(512, images // 10)
            if images == 50_000:  # batch 512: REM's step stays
                assert chosen["step_size"] == pytest.approx(config["step_size"])
            else:
                assert config["step_size"] < chosen["step_size"] <= config["eps"] / 4

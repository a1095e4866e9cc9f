"""T2UE: the text-to-noise generator, its training, saved generators, protection from text
alone, and the contrastive victim; tiny random CLIP (no weights, no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from attacks.contrastive import (
    RECALL_AT,
    HeldOutPairs,
    attribute_captions,
    captions_from_file,
    class_caption_list,
    contrastive_cell,
    recall_at_k,
)
from attacks.verify import Cell, VerifyData, load_verify_data, run_cell
from attacks.data import ImageSet
from protect.budget import budget_in_levels
from protect.cli import app
from protect.config import ConfigError
from protect.generator import Batch, bounded_perturbation, create_generator, resolve_config
from protect.images import load_image
from protect.models.clip import TINY_TEST_MODEL, load_clip
from protect.runner import protect_export, protect_folder
from protect.t2ue import (
    CLIP_TEMPLATES,
    GeneratorSpec,
    T2UEError,
    T2UETrainConfig,
    TextCondition,
    TextImagePairs,
    build_generator,
    class_captions,
    code_for,
    encode_captions,
    generator_paths,
    infonce_of,
    load_generator,
    noise_from_text,
    save_generator,
    text_fingerprint,
    train_generator,
)

EPS = 8 / 255
CLASSES = ["cat", "dog", "car", "ship"]


@pytest.fixture(scope="module")
def clip():
    return load_clip(TINY_TEST_MODEL, weights="random")


def tiny_pairs(n: int = 32, seed: int = 0, flat: bool = False) -> TextImagePairs:
    """n random 32 px images (``flat``: each one grey level), class i % 4, each with two
    template captions of its class."""
    gen = torch.Generator().manual_seed(seed)
    if flat:
        images = (torch.rand(n, 1, 1, 1, generator=gen) * 200 + 28).expand(n, 3, 32, 32).to(torch.uint8).clone()
    else:
        images = torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % len(CLASSES)
    options = torch.stack([labels, labels + len(CLASSES)], dim=1)
    return TextImagePairs(images, class_captions(CLASSES, CLIP_TEMPLATES[:2]), options, "tiny")


def tiny_config(**extra) -> T2UETrainConfig:
    settings = dict(clip_model=TINY_TEST_MODEL, clip_weights="random", width=16, epochs=2, batch_size=8, bn_batches=2)
    return T2UETrainConfig(**(settings | extra))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, clip) -> Path:
    """A generator trained for two epochs on the tiny set."""
    out = tmp_path_factory.mktemp("generator")
    return train_generator(tiny_pairs(), tiny_config(), out, clip=clip).generator


@pytest.fixture(scope="module")
def trained_unet(tmp_path_factory, clip) -> Path:
    """A diffusers-UNet generator trained for one epoch (two steps) on the tiny set."""
    out = tmp_path_factory.mktemp("generator-unet")
    return train_generator(tiny_pairs(16), tiny_config(backbone="unet", epochs=1), out, clip=clip).generator


@pytest.fixture(params=["ssa", "unet"])
def trained_any(request) -> Path:
    """Each backbone's trained generator."""
    return request.getfixturevalue("trained" if request.param == "ssa" else "trained_unet")


def test_generator_output_is_within_budget_for_any_input() -> None:
    net = build_generator(GeneratorSpec(resolution=24, text_dim=32, width=16)).eval()
    gen = torch.Generator().manual_seed(0)
    text = TextCondition(torch.randn(5, 32, generator=gen) * 1000)  # far outside any real embedding
    z = torch.randn(5, 100, generator=gen) * 1000
    delta = net.perturbation(text, z, EPS)
    assert delta.shape == (5, 3, 24, 24) and delta.dtype == torch.float32
    assert delta.abs().max() <= EPS + 1e-7
    assert delta.abs().max() > 0


def test_same_text_and_code_give_the_same_noise(trained_any: Path) -> None:
    loaded = load_generator(trained_any, clip_weights="random")
    z = code_for("a photo of a cat.", 0, loaded.net.spec.z_dim)
    assert torch.equal(z, code_for("a photo of a cat.", 0, loaded.net.spec.z_dim))
    alone = noise_from_text(loaded, ["a photo of a cat."], z[None])
    # eval mode: a caption's noise does not depend on the other captions of the batch
    in_batch = noise_from_text(loaded, ["a photo of a dog.", "a photo of a cat."],
                               torch.stack([code_for("x", 0, loaded.net.spec.z_dim), z]))
    assert torch.allclose(alone[0], in_batch[1], atol=1e-6)
    assert torch.equal(alone, noise_from_text(loaded, ["a photo of a cat."], z[None]))
    other_code = noise_from_text(loaded, ["a photo of a cat."], code_for("a photo of a cat.", 1, loaded.net.spec.z_dim)[None])
    assert not torch.allclose(alone, other_code)


def test_training_lowers_the_surrogate_infonce(tmp_path: Path, clip) -> None:
    """Error-minimising: the trained generator's noise makes the frozen CLIP match images to
    their captions better than an untrained generator's noise does. (Flat images and a larger
    budget, because a random CLIP barely reacts to 8/255 on textured images.)"""
    pairs = tiny_pairs(flat=True)
    config = tiny_config(eps=16 / 255, lr=1e-2, epochs=25, batch_size=8, precision="fp32")
    summary = train_generator(pairs, config, tmp_path, clip=clip, seed=0)
    untrained = build_generator(GeneratorSpec(32, 32, config.z_dim, config.width), seed=0).eval()
    before = infonce_of(untrained, clip, pairs, config.eps)
    after = infonce_of(load_generator(summary.generator, clip_weights="random").net, clip, pairs, config.eps)
    assert after < before - 0.02, (before, after)
    assert np.mean(summary.epoch_losses[-5:]) < np.mean(summary.epoch_losses[:5])


@pytest.mark.parametrize("learner", ["frozen", "bilevel"])
def test_interrupted_training_resumes_to_the_same_generator(tmp_path: Path, clip, learner: str) -> None:
    """Also for the bi-level loop (with augmentation and caption codes), whose learner CLIP is
    part of the checkpoint."""
    extra = {"learner": learner, "augment": True, "codes": "caption", "learner_model": TINY_TEST_MODEL} if learner == "bilevel" else {}
    pairs, config = tiny_pairs(16), tiny_config(epochs=3, **extra)
    whole = train_generator(pairs, config, tmp_path / "whole", clip=clip).generator

    def stop_after_first(epoch: int, loss: float) -> None:
        if epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_generator(pairs, config, tmp_path / "resumed", clip=clip, on_epoch=stop_after_first)
    assert json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())["epoch"] == 1
    summary = train_generator(pairs, config, tmp_path / "resumed", clip=clip)
    assert summary.resumed_from_epoch == 1
    assert load_file(str(summary.generator)).keys() == load_file(str(whole)).keys()
    for key, value in load_file(str(whole)).items():
        assert torch.equal(value, load_file(str(summary.generator))[key]), key
    # another config in the same folder is refused, not silently mixed
    with pytest.raises(T2UEError, match="another training"):
        train_generator(pairs, tiny_config(epochs=4, **extra), tmp_path / "resumed", clip=clip)


def test_unet_generator_saves_and_loads_in_the_same_format(tmp_path: Path, trained_unet: Path, clip) -> None:
    loaded = load_generator(trained_unet, clip_weights="random")
    assert loaded.net.spec.backbone == "unet" and loaded.description["format"] == "protect-t2ue-generator/1"
    text = encode_captions(clip, ["a red car.", "a photo of a ship."], tokens=True)
    assert text.tokens.shape[:2] == text.mask.shape and text.mask[:, 0].all() and not text.mask.all()
    z = torch.randn(2, 100, generator=torch.Generator().manual_seed(0))
    delta = loaded.net.perturbation(text, z, EPS)
    assert delta.shape == (2, 3, 32, 32) and 0 < delta.abs().max() <= EPS + 1e-7
    path = save_generator(tmp_path / "copy", loaded.net, EPS, text_fingerprint(clip), {})
    assert torch.equal(load_generator(path, clip_weights="random").net.perturbation(text, z, EPS), delta)
    with pytest.raises(T2UEError, match="unknown generator backbone 'vae'; available: ssa, unet"):
        GeneratorSpec(32, 32, backbone="vae")


def test_save_load_round_trip_and_wrong_text_encoder(tmp_path: Path, clip) -> None:
    net = build_generator(GeneratorSpec(32, 32, width=16, clip_model=TINY_TEST_MODEL), seed=3).eval()
    path = save_generator(tmp_path / "g", net, EPS, text_fingerprint(clip), {"note": "test"})
    assert generator_paths(path) == (tmp_path / "g.safetensors", tmp_path / "g.yaml")
    loaded = load_generator(tmp_path / "g.yaml", clip_weights="random")
    text, z = encode_captions(clip, ["a photo of a ship."]), torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.net.perturbation(text, z, EPS), net.perturbation(text, z, EPS))
    assert loaded.eps == EPS and loaded.description["note"] == "test"
    tensors = load_file(str(path))
    tensors["text_fingerprint"] = tensors["text_fingerprint"] + 0.1
    save_file(tensors, str(path))
    with pytest.raises(T2UEError, match="not the one this generator was trained with"):
        load_generator(path, clip_weights="random")
    with pytest.raises(T2UEError, match="protect t2ue train"):
        load_generator(tmp_path / "missing.safetensors")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_noise_from_text_alone_then_added_to_an_image(tmp_path: Path, trained_any: Path, make_images) -> None:
    """`protect t2ue noise` reads no image; `apply` adds its output within the budget."""
    trained = trained_any
    result = invoke("t2ue", "noise", "a photo of a cat.", "--generator", trained, "--clip-weights", "random",
                    "--size", "40x24", "--out", tmp_path / "noise.png")
    assert result.exit_code == 0, result.output
    stored = load_image(tmp_path / "noise.png").rgb.astype(int) - 128
    assert stored.shape == (24, 40, 3)
    assert 0 < np.abs(stored).max() <= budget_in_levels(EPS)
    again = invoke("t2ue", "noise", "a photo of a cat.", "--generator", trained, "--clip-weights", "random",
                   "--size", "40x24", "--out", tmp_path / "again.png")
    assert again.exit_code == 0 and (tmp_path / "again.png").read_bytes() == (tmp_path / "noise.png").read_bytes()

    image = make_images("photos", classes=None, per_class=2)[1]  # 40x24
    before = image.read_bytes()
    result = invoke("t2ue", "apply", image, tmp_path / "noise.png", tmp_path / "protected.png")
    assert result.exit_code == 0, result.output
    original, protected = load_image(image).rgb.astype(int), load_image(tmp_path / "protected.png").rgb.astype(int)
    assert 0 < np.abs(protected - original).max() <= budget_in_levels(EPS)
    assert image.read_bytes() == before
    assert invoke("t2ue", "apply", image, tmp_path / "noise.png", tmp_path / "p.png", "--eps", "2/255").exit_code == 2


def test_classwise_noise_per_class_samplewise_per_image(trained: Path) -> None:
    paths = ["cat/a.png", "cat/b.png", "dog/c.png"]
    batch = Batch(images=torch.full((3, 3, 32, 32), 0.5), labels=None, indices=torch.arange(3), paths=paths,
                  class_names=["cat", "cat", "dog"])
    deltas = {}
    for mode in ("classwise", "samplewise"):
        config = resolve_config("t2ue", overrides={"generator": str(trained), "surrogate_weights": "random", "mode": mode})
        deltas[mode] = bounded_perturbation(create_generator("t2ue", config, seed=0), batch)
        assert deltas[mode].abs().max() <= EPS + 1e-6
    assert torch.equal(deltas["classwise"][0], deltas["classwise"][1])
    assert not torch.allclose(deltas["classwise"][0], deltas["classwise"][2])
    assert not torch.allclose(deltas["samplewise"][0], deltas["samplewise"][1])


def test_run_with_a_captions_file_and_its_errors(tmp_path: Path, trained: Path, make_images) -> None:
    inputs = make_images("flat", classes=None, per_class=3)
    source = tmp_path / "flat"
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps({"image": p.name, "caption": f"picture number {i}"}) for i, p in enumerate(inputs)))
    settings = ["--set", f"generator={trained}", "--set", "surrogate_weights=random"]
    result = invoke("run", "t2ue", source, tmp_path / "out", *settings, "--captions", captions)
    assert result.exit_code == 0, result.output
    for path in inputs:
        written = load_image(tmp_path / "out" / path.with_suffix(".png").name).rgb.astype(int)
        assert np.abs(written - load_image(path).rgb.astype(int)).max() <= budget_in_levels(EPS)
    # A flat folder without captions, an image missing from the captions: those files fail by name.
    uncaptioned = invoke("run", "t2ue", source, tmp_path / "o2", *settings)
    assert uncaptioned.exit_code == 1 and "pass --captions FILE" in uncaptioned.output
    captions.write_text(json.dumps({"image": inputs[0].name, "caption": "only one"}))
    partial = protect_folder("t2ue", source, tmp_path / "o3", overrides={"generator": str(trained), "surrogate_weights": "random",
                                                                         "captions": str(captions)})
    assert partial.exit_code == 1 and partial.written == 1
    assert [f.path for f in partial.failed] == [str(p) for p in inputs[1:]]
    assert f"has no caption for {inputs[1].name}" in partial.failed[0].reason
    # No generator: a usage error.
    result = invoke("run", "t2ue", source, tmp_path / "o4")
    assert result.exit_code == 2 and "protect t2ue train" in result.output
    with pytest.raises(ConfigError, match="generator file not found"):
        create_generator("t2ue", resolve_config("t2ue", overrides={"generator": str(tmp_path / "none.safetensors")}))


def test_batch_protects_each_record_from_its_caption_or_class(tmp_path: Path, trained: Path) -> None:
    """A manifest export: a record's caption column is its text, else its label's class-wise
    template; a record with neither is failed by name and the rest are written. The generator
    is loaded once for the whole export (nothing to fit per unit)."""
    grey = np.full((20, 24, 3), 128, np.uint8)
    (tmp_path / "src" / "images").mkdir(parents=True)
    rows = [
        {"image": "images/a.png", "caption": "a photo of a cat.", "label": ""},
        {"image": "images/b.png", "caption": "a photo of a cat.", "label": ""},
        {"image": "images/c.png", "caption": "a red car parked on a street.", "label": ""},
        {"image": "images/d.png", "caption": "", "label": "cat"},
        {"image": "images/e.png", "caption": "", "label": ""},
    ]
    for row in rows:
        Image.fromarray(grey).save(tmp_path / "src" / row["image"])
    (tmp_path / "src" / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    summary = protect_export("t2ue", tmp_path / "src" / "data.jsonl", tmp_path / "out", unit_size=2, workers=1,
                             overrides={"generator": str(trained), "surrogate_weights": "random"})
    assert summary.fit.startswith("once")
    assert len(summary.failed) == 1 and "images/e.png" in summary.failed[0][0], summary.failed
    assert "needs a caption" in summary.failed[0][1]
    out = {name: load_image(tmp_path / "out" / "images" / name).rgb.astype(int) for name in ("a.png", "b.png", "c.png", "d.png")}
    assert not (tmp_path / "out" / "images" / "e.png").exists()
    assert all(np.abs(image - grey).max() <= budget_in_levels(EPS) for image in out.values())
    assert np.array_equal(out["a.png"], out["b.png"])  # same caption: same class-wise noise
    assert np.array_equal(out["a.png"], out["d.png"])  # label cat: the template gives the same caption
    assert not np.array_equal(out["a.png"], out["c.png"])

    # Sample-wise codes follow each record's name within the export, not where the export lies.
    shutil.copytree(tmp_path / "src", tmp_path / "moved" / "elsewhere")
    written = []
    for source, dest in ((tmp_path / "src", tmp_path / "sw1"), (tmp_path / "moved" / "elsewhere", tmp_path / "sw2")):
        protect_export("t2ue", source / "data.jsonl", dest, unit_size=2, workers=1,
                       overrides={"generator": str(trained), "surrogate_weights": "random", "mode": "samplewise"})
        written.append([(dest / "images" / name).read_bytes() for name in ("a.png", "b.png", "c.png", "d.png")])
    assert written[0] == written[1]
    assert written[0][0] != written[0][1]  # same caption, another image: another code


def test_train_command_on_a_labelled_folder(tmp_path: Path, make_images) -> None:
    make_images("labelled", classes=("cat", "dog"), per_class=3)
    result = invoke("t2ue", "train", tmp_path / "labelled", tmp_path / "gen", "--set", f"clip_model={TINY_TEST_MODEL}",
                    "--set", "clip_weights=random", "--set", "width=8", "--set", "epochs=1", "--set", "batch_size=4")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "gen" / "generator.safetensors").exists() and (tmp_path / "gen" / "generator.yaml").exists()
    assert invoke("t2ue", "train", tmp_path / "labelled", tmp_path / "g2", "--set", "nope=1").exit_code == 2


def test_recall_at_k_on_a_toy_set_with_known_answers() -> None:
    # 4 images, 3 distinct captions; image i's own caption is caption_of[i].
    caption_of = torch.tensor([0, 1, 2, 2])
    similarity = torch.tensor([
        [0.9, 0.1, 0.0],  # image 0: own caption ranked 1st
        [0.8, 0.5, 0.1],  # image 1: 2nd
        [0.2, 0.6, 0.1],  # image 2: 3rd
        [0.0, 0.1, 0.7],  # image 3: 1st
    ])
    recall = recall_at_k(similarity, caption_of, ks=(1, 2, 3))
    assert [recall[f"image_to_text_r{k}"] for k in (1, 2, 3)] == pytest.approx([2 / 4, 3 / 4, 1.0])
    # caption 0's nearest image is image 0 (its own); caption 1's is image 2, then its own image 1;
    # caption 2's is image 3 (one of its two images).
    assert [recall[f"text_to_image_r{k}"] for k in (1, 2, 3)] == pytest.approx([2 / 3, 1.0, 1.0])


def test_attribute_captions_describe_class_colour_and_brightness() -> None:
    images = torch.zeros(3, 3, 32, 32, dtype=torch.uint8)
    images[0, 0] = 200  # red everywhere, mid brightness
    images[1] = 250  # white, bright
    images[1, :, 8:24, 8:24] = torch.tensor([20, 40, 200], dtype=torch.uint8)[:, None, None]  # a blue centre
    images[2] = 10  # black, dark
    captions = attribute_captions(images, torch.tensor([0, 1, 2]), ["fire_truck", "ship", "cat"])
    assert captions == ["a dark photo of a red fire truck on a red background.",
                        "a bright photo of a blue ship on a white background.",
                        "a dark photo of a black cat on a black background."]


def test_contrastive_victim_reports_zero_shot_and_recall() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.arange(24) % 3
    captions = [f"a photo of a {c} number {i % 5}." for i, c in enumerate(class_caption_list(labels, ["cat", "dog", "car"]))]
    held_out = HeldOutPairs(images[:12], captions[:12], labels[:12], ["cat", "dog", "car"])
    result = contrastive_cell("clip-tiny", images, captions, held_out, epochs=2, seed=0)
    recall = result["recall"]
    assert set(recall) == {f"{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in RECALL_AT}
    for direction in ("image_to_text", "text_to_image"):
        values = [recall[f"{direction}_r{k}"] for k in RECALL_AT]
        assert all(0 <= v <= 1 for v in values) and values == sorted(values)
    assert result["distinct_test_captions"] == 12
    assert len(result["test_accuracy"]) == 2 and 0 <= result["final"] <= 1


def test_per_image_captions_flow_from_a_file_into_verify(tmp_path: Path, make_images) -> None:
    """Captions of a CSV (train) and a JSONL (test) reach the contrastive victim's training and
    its held-out scoring; an image without a caption is named."""
    clean, test, protected = tmp_path / "clean", tmp_path / "test", tmp_path / "protected"
    train_paths = [p.relative_to(clean).as_posix() for p in make_images("clean", per_class=6)]
    test_paths = [p.relative_to(test).as_posix() for p in make_images("test", per_class=3, seed=5)]
    shutil.copytree(clean, protected)
    first = next(p for p in sorted(protected.rglob("*.png")))  # one level off, so the copy counts as protected
    pixels = np.array(Image.open(first).convert("RGB"))
    pixels[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(first)
    (tmp_path / "train.csv").write_text("image,caption\n" + "".join(f"{p},picture {i} of {p.split('/')[0]}\n" for i, p in enumerate(train_paths)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"image": p, "caption": f"held out {i}"}) + "\n" for i, p in enumerate(test_paths)))
    data = load_verify_data(protected, clean, test, captions=tmp_path / "train.csv", test_captions=tmp_path / "test.jsonl")
    captions, held_out = data.contrastive_pairs()
    assert captions[train_paths[3]] == f"picture 3 of {train_paths[3].split('/')[0]}"
    assert held_out.captions == [f"held out {test_paths.index(p)}" for p in data.test.paths]
    assert data.captions_source == "train.csv + test.jsonl"
    from protect.progress import NullReporter

    out = run_cell(Cell("clip-tiny", "none", (), "protected", 1, 0), data, device=torch.device("cpu"), reporter=NullReporter())
    assert out["distinct_test_captions"] == len(test_paths) and out["captions"] == "train.csv + test.jsonl"
    assert set(out["recall"]) == {f"{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in RECALL_AT}

    default = load_verify_data(protected, clean, test)
    assert default.captions_source == "attributes" and default.contrastive_pairs()[0][train_paths[0]].startswith("a ")
    (tmp_path / "short.csv").write_text("image,caption\n" + f"{train_paths[0]},only one\n")
    with pytest.raises(ValueError, match=f"short.csv has no caption for {train_paths[1]}"):
        load_verify_data(protected, clean, test, captions=tmp_path / "short.csv")

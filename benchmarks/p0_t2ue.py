"""Protocol P0 for T2UE (Ma et al., arXiv:2508.03091): supervised and contrastive victims of noise
made from text alone.

No pretrained CLIP is available offline, so the surrogate is a small CLIP trained here from
scratch on CIFAR-10 train images 4000.. of every class (disjoint from the protected first ones)
with per-image attribute captions (attacks.contrastive.attribute_captions); generators train on
those same disjoint images, so they never see the images they protect (zero contact).

    python benchmarks/p0_t2ue.py factors --per-class 500 --test-per-class 100 --surrogate-per-class 500
        # what limits the effect on a contrastive victim: one row per generator training
        # setting (FACTORS), class-wise noise added in memory, victims on 500 images/class
    python benchmarks/p0_t2ue.py full --gen 'learner=bilevel,augment=true' --backbones ssa,unet
        # P0: generators of each backbone, protection through `protect run t2ue` (class-wise,
        # sample-wise, from each image's caption), small CNN x 3 seeds and a contrastive victim
        # trained on each image's caption; tables p0-t2ue and p0-t2ue-backbones

Contrastive victims are scored by zero-shot accuracy and by recall@1/5/10 both ways on the
held-out test images, each with its own attribute caption. Finished steps are kept in
benchmarks/results/p0_t2ue/ (results.json, factors.json, generators), so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from attacks.contrastive import (
    CONTRASTIVE_VICTIMS,
    RECALL_AT,
    ClipTrainConfig,
    HeldOutPairs,
    attribute_captions,
    build_clip_victim,
    class_caption_list,
    contrastive_cell,
    retrieval_recall,
    save_clip,
    train_clip,
    zero_shot_accuracy,
)
from attacks.data import ImageSet, load_image_folder, load_pairs
from attacks.train import TrainConfig, train_classifier
from attacks.verify import victim_train_config
from protect.budget import perturb_uint8
from protect.models import build_classifier
from protect.models.clip import ClipEncoders, load_clip
from protect.t2ue import (
    CLIP_TEMPLATES,
    LoadedGenerator,
    T2UETrainConfig,
    TextImagePairs,
    code_for,
    infonce_of,
    load_generator,
    noise_from_text,
    pairs_from_folder,
    train_generator,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from p0 import build_subset, generate, mean_std  # noqa: E402
from tables import command_line, machine, print_markdown_table, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "results" / "p0_t2ue"
SECTION = "P0: protection from text alone"


def noise_throughput(loaded: LoadedGenerator, count: int = 1000, batch: int = 128) -> float:
    """Noise images per second from captions alone (text embedding + generator, 32 px)."""
    texts = [CLIP_TEMPLATES[i % len(CLIP_TEMPLATES)].format(f"thing {i}") for i in range(count)]
    started = time.perf_counter()
    for start in range(0, count, batch):
        chunk = texts[start : start + batch]
        noise_from_text(loaded, chunk, torch.stack([code_for(t, 0, loaded.net.spec.z_dim) for t in chunk]))
    return count / (time.perf_counter() - started)


# Factors -----------------------------------------------------------------------------------
# Each factor run: a generator trained on the disjoint pairs with these T2UETrainConfig keys
# (over FACTOR_BASE), class-wise noise from "a photo of a {class}." added in memory (8-bit,
# as `protect run` writes it), and victims trained on the protected images with their
# attribute captions. "clean" and "random class-wise" (a fixed uniform pattern per class) are
# the controls: the second shows what an ideal class-wise shortcut does to each victim.
FACTOR_BASE = dict(width=128, epochs=10, lr=1e-3, learner="frozen", augment=False, codes="random", backbone="ssa")
FACTORS: dict[str, dict] = {
    "clean": {},
    "random class-wise": {},
    "frozen (paper)": {},
    "frozen + augment": {"augment": True},
    "bi-level + augment": {"learner": "bilevel", "augment": True},
    "bi-level + augment + caption z": {"learner": "bilevel", "augment": True, "codes": "caption"},
    "frozen+bi-level + augment": {"learner": "frozen+bilevel", "augment": True},
    "bi-level + augment + unet": {"learner": "bilevel", "augment": True, "backbone": "unet", "width": 64},
    "frozen + surrogate 3x epochs": {"surrogate_epochs": 3},
    "frozen + 30 epochs": {"epochs": 30},
    "frozen + lr 1e-4": {"lr": 1e-4},
}
# Factor keys that are not generator training keys: the surrogate's epochs as a multiple of --surrogate-epochs.
SURROGATE_KEYS = ("surrogate_epochs",)
CONTROLS = ("clean", "random class-wise")


def class_prompt(name: str) -> str:
    return f"a photo of a {name.replace('_', ' ')}."


def disjoint_set(cifar: Path, per_class: int, offset: int = 4000) -> ImageSet:
    """Train images offset..offset+per_class of every class (disjoint from the protected first ones)."""
    return load_image_folder(build_subset(cifar / "train", WORK / f"train-{offset}-{per_class}", per_class, offset=offset))


def train_caption_surrogate(name: str, data: ImageSet, epochs: int, path: Path, log: Callable[[str], None]) -> ClipEncoders:
    """A CLIP trained from scratch on (image, attribute caption) pairs; reused when ``path`` exists."""
    if not path.exists():
        clip = build_clip_victim(name, seed=1234)
        result = train_clip(clip, data.images, attribute_captions(data.images, data.labels, data.classes),
                            ClipTrainConfig(epochs=epochs), seed=1234)
        save_clip(clip, path)
        log(f"surrogate {name}: {result.seconds:.0f} s")
    return load_clip(CONTRASTIVE_VICTIMS[name], weights=str(path))


def classwise_noise(loaded: LoadedGenerator, classes: list[str], labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Class-wise T2UE noise in memory: each class's prompt and that prompt's code, as
    ``protect run t2ue`` (mode=classwise) gives it."""
    prompts = [class_prompt(c) for c in classes]
    codes = torch.stack([code_for(p, seed, loaded.net.spec.z_dim) for p in prompts])
    return noise_from_text(loaded, prompts, codes)[labels]


def random_classwise_noise(classes: list[str], labels: torch.Tensor, eps: float, seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return ((torch.rand(len(classes), 3, 32, 32, generator=gen) * 2 - 1) * eps)[labels]


def victim_scores(train: ImageSet, captions: list[str], held_out: HeldOutPairs, noisy_test: torch.Tensor | None,
                  *, victim: str, epochs: int, augment: bool, seed: int = 0) -> dict:
    """A contrastive victim trained on ``train`` with ``captions``: zero-shot accuracy and
    recall on clean held-out pairs, and zero-shot accuracy on the test images carrying the
    same class-wise noise (high when the victim learned the noise instead of the images)."""
    clip = build_clip_victim(victim, seed=seed)
    result = train_clip(clip, train.images, captions, ClipTrainConfig(epochs=epochs, augment=augment), seed=seed)
    scores = held_out.score(clip)
    if noisy_test is not None:
        scores["zero_shot_noisy_test"] = zero_shot_accuracy(clip, noisy_test, held_out.labels, held_out.classes)
    return {**scores, "final_loss": result.losses[-1], "seconds": result.seconds}


def run_factors(args: argparse.Namespace, log: Callable[[str], None]) -> None:
    cifar = args.shared / "data" / "cifar10"
    eps = 8 / 255
    clean_train = load_image_folder(build_subset(cifar / "train", WORK / f"train-first{args.per_class}", args.per_class))
    test = load_image_folder(cifar / "test", per_class=args.test_per_class, classes=clean_train.classes)
    disjoint = disjoint_set(cifar, args.surrogate_per_class)
    classes = clean_train.classes
    train_captions = attribute_captions(clean_train.images, clean_train.labels, classes)
    held_out = HeldOutPairs(test.images, attribute_captions(test.images, test.labels, classes), test.labels, classes)
    surrogates: dict[int, tuple[Path, ClipEncoders, dict]] = {}

    def surrogate_for(multiple: int) -> tuple[Path, ClipEncoders, dict]:
        if multiple not in surrogates:
            epochs = args.surrogate_epochs * multiple
            weights = WORK / f"surrogate-{args.surrogate}-captions-{args.surrogate_per_class}-{epochs}.safetensors"
            clip = train_caption_surrogate(args.surrogate, disjoint, epochs, weights, log)
            surrogates[multiple] = (weights, clip, held_out.score(clip))
            log(f"surrogate ({epochs} epochs): zero-shot {surrogates[multiple][2]['zero_shot']:.3f}")
        return surrogates[multiple]

    surrogate_scores = surrogate_for(1)[2]
    pairs = TextImagePairs(disjoint.images, [class_prompt(c) for c in classes], disjoint.labels[:, None].clone(), "disjoint")
    out = WORK / "factors.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.variants.split(",") if args.variants else FACTORS:
        if name not in FACTORS:
            sys.exit(f"unknown factor {name!r}; available: {', '.join(FACTORS)}")
        key = f"{name} | {args.victim} | {args.per_class}/class"
        if key in results:
            log(f"{key}: already measured")
            continue
        row: dict[str, Any] = {"settings": {**FACTOR_BASE, **FACTORS[name]} if name not in CONTROLS else {}}
        multiple = row["settings"].pop("surrogate_epochs", 1)
        weights, surrogate, scores = surrogate_for(multiple)
        row["surrogate_zero_shot"] = scores["zero_shot"]
        noise = noisy_test = None
        if name == "random class-wise":
            noise, test_noise = random_classwise_noise(classes, clean_train.labels, eps), random_classwise_noise(classes, test.labels, eps)
        elif name != "clean":
            config = T2UETrainConfig(clip_model=CONTRASTIVE_VICTIMS[args.surrogate], clip_weights=str(weights),
                                     templates=["a photo of a {}."], **row["settings"])
            slug = "-".join(f"{k}{v}" for k, v in sorted(row["settings"].items()))
            started = time.perf_counter()
            folder = WORK / f"factor-{args.surrogate}-{args.surrogate_per_class}-{args.surrogate_epochs * multiple}-{slug}"
            trained = train_generator(pairs, config, folder, clip=surrogate,
                                      on_epoch=lambda e, loss: log(f"  generator epoch {e}: InfoNCE {loss:.3f}"))
            row["generator_seconds"] = time.perf_counter() - started
            loaded = load_generator(trained.generator, clip_weights=str(weights))
            row["generator_parameters"] = sum(p.numel() for p in loaded.net.parameters())
            noise, test_noise = classwise_noise(loaded, classes, clean_train.labels), classwise_noise(loaded, classes, test.labels)
        data = clean_train
        if noise is not None:
            data = ImageSet(perturb_uint8(clean_train.images, noise, eps), clean_train.labels, classes, clean_train.paths)
            noisy_test = perturb_uint8(test.images, test_noise, eps)
        for augment in (True, False) if name in ("clean", "random class-wise", "frozen (paper)") else (True,):
            row[f"clip augment={augment}"] = victim_scores(data, train_captions, held_out, noisy_test, victim=args.victim,
                                                          epochs=args.epochs, augment=augment)
            log(f"  {name} / augment={augment}: {row[f'clip augment={augment}']}")
        model = build_classifier("small-cnn", len(classes), seed=0)
        row["small_cnn"] = train_classifier(model, data, test, victim_train_config("small-cnn", args.epochs, len(data)), seed=0).final
        log(f"  {name} / small CNN {row['small_cnn']:.3f}")
        results[key] = row
        out.write_text(json.dumps(results, indent=2))
    write_factor_table(results, surrogate_scores, args)


def _pct(values: list[float]) -> str:
    return "/".join(f"{100 * v:.1f}" for v in values)


def write_factor_table(results: dict, surrogate: dict, args: argparse.Namespace) -> None:
    columns = ["factor", "generator s", "generator params", "CLIP zero-shot % (victim aug / no aug)", "i->t R@1/5/10 %",
               "t->i R@1/5/10 %", "zero-shot on noisy test %", "small CNN %"]
    rows = []
    for key, row in results.items():
        name, victim, scale = key.split(" | ")
        if victim != args.victim or scale != f"{args.per_class}/class":
            continue
        if row.get("surrogate_zero_shot", surrogate["zero_shot"]) != surrogate["zero_shot"]:
            name += f" (surrogate zero-shot {100 * row['surrogate_zero_shot']:.1f}%)"
        clip = row["clip augment=True"]
        no_aug = row.get("clip augment=False")
        rows.append([
            name, round(row["generator_seconds"]) if "generator_seconds" in row else "-", row.get("generator_parameters", "-"),
            f"{100 * clip['zero_shot']:.1f}" + (f" / {100 * no_aug['zero_shot']:.1f}" if no_aug else ""),
            _pct([clip[f"image_to_text_r{k}"] for k in RECALL_AT]), _pct([clip[f"text_to_image_r{k}"] for k in RECALL_AT]),
            f"{100 * clip['zero_shot_noisy_test']:.1f}" if "zero_shot_noisy_test" in clip else "-", f"{100 * row['small_cnn']:.1f}",
        ])
    print_markdown_table(columns, rows)
    write_table(
        "p0-t2ue-factors",
        title="T2UE: what limits the effect on a contrastive victim (pilot scale)",
        command=command_line(),
        protocol=(f"P0 subset: {args.per_class} protected train images per class, test {args.test_per_class}/class; surrogate "
                  f"{args.surrogate} trained from scratch on {args.surrogate_per_class}/class disjoint images (4000..) with attribute "
                  f"captions ({args.surrogate_epochs} epochs, zero-shot {100 * surrogate['zero_shot']:.1f}%); generators on the same "
                  f"disjoint images with class prompts; class-wise noise; victims {args.victim} and small CNN, {args.epochs} epochs, "
                  "1 seed, trained on each image's attribute caption; recall on the held-out attribute captions"),
        columns=columns, rows=rows, hardware=machine(), section=SECTION,
        notes=f"generator base: {FACTOR_BASE}; 'zero-shot on noisy test' = the victim on test images carrying the same class-wise noise.",
    )


def parse_settings(text: str) -> dict[str, Any]:
    """"key=value,key=value" of T2UETrainConfig keys, values as YAML scalars."""
    settings: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        settings[key.strip()] = yaml.safe_load(value)
    return settings


def write_captions_file(path: Path, paths: list[str], captions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in zip(paths, captions)), encoding="utf-8")
    return path


def caption_pairs(data: ImageSet, captions: list[str]) -> TextImagePairs:
    """Each image with two caption options: its class prompt and its own caption."""
    texts = list(dict.fromkeys([class_prompt(c) for c in data.classes] + captions))
    index = {t: i for i, t in enumerate(texts)}
    options = torch.stack([data.labels, torch.tensor([index[c] for c in captions])], dim=1)
    return TextImagePairs(data.images, texts, options, "CIFAR-10 train 4000.. (class prompts and attribute captions)")


def backbone_settings(spec: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` for the backbone ``spec``: a name, or name@width (e.g. unet@64)."""
    name, _, width = spec.partition("@")
    return {**settings, "backbone": name, **({"width": int(width)} if width else {})}


def train_full_generator(
    backbone: str, settings: dict[str, Any], pairs: TextImagePairs, surrogate: ClipEncoders, weights: Path, args: argparse.Namespace,
    log: Callable[[str], None],
) -> dict[str, Any]:
    own = backbone_settings(backbone, settings)
    config = T2UETrainConfig(clip_model=CONTRASTIVE_VICTIMS[args.surrogate], clip_weights=str(weights), **own)
    slug = "-".join(f"{k}{v}" for k, v in sorted(own.items()))
    folder = WORK / f"generator-{args.surrogate}-{args.surrogate_per_class}-captions-{slug}"
    started = time.perf_counter()
    trained = train_generator(pairs, config, folder, clip=surrogate,
                              on_epoch=lambda e, loss: log(f"  {backbone} generator epoch {e}: InfoNCE {loss:.3f}"))
    loaded = load_generator(trained.generator, clip_weights=str(weights))
    return {
        "path": str(trained.generator), "backbone": backbone, "settings": own,
        # the training's own clock, which a resumed training continues
        "seconds": trained.seconds, "wall_seconds": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in loaded.net.parameters()),
        "first_loss": trained.epoch_losses[0], "last_loss": trained.epoch_losses[-1],
        "noise_images_per_s": noise_throughput(loaded),
        "infonce_clean": infonce_of(loaded.net, surrogate, pairs, config.eps, with_noise=False),
        "infonce_noisy": infonce_of(loaded.net, surrogate, pairs, config.eps),
    }


def run_full(args: argparse.Namespace, log: Callable[[str], None]) -> None:
    cifar = args.shared / "data" / "cifar10"
    subset = build_subset(cifar / "train", WORK / f"train-first{args.per_class}", args.per_class)
    clean_train = load_image_folder(subset)
    classes = clean_train.classes
    test = load_image_folder(cifar / "test", per_class=args.test_per_class, classes=classes)
    disjoint = disjoint_set(cifar, args.surrogate_per_class)
    train_captions = attribute_captions(clean_train.images, clean_train.labels, classes)
    captions_file = write_captions_file(WORK / f"captions-first{args.per_class}.jsonl", clean_train.paths, train_captions)
    held_out = HeldOutPairs(test.images, attribute_captions(test.images, test.labels, classes), test.labels, classes)
    weights = WORK / f"surrogate-{args.surrogate}-captions-{args.surrogate_per_class}-{args.surrogate_epochs}.safetensors"
    surrogate = train_caption_surrogate(args.surrogate, disjoint, args.surrogate_epochs, weights, log)
    surrogate_scores = held_out.score(surrogate)
    settings = {**FACTOR_BASE, **parse_settings(args.gen)}
    settings.pop("backbone", None)
    pairs = caption_pairs(disjoint, attribute_captions(disjoint.images, disjoint.labels, classes))
    out = WORK / "results.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    generators = {}
    for backbone in args.backbones.split(","):
        key = f"generator | {backbone} | {json.dumps(settings, sort_keys=True)}"
        if key not in results:
            results[key] = train_full_generator(backbone, settings, pairs, surrogate, weights, args, log)
            out.write_text(json.dumps(results, indent=2))
        generators[backbone] = results[key]
        log(f"generator {backbone}: {generators[backbone]}")
    default = args.backbones.split(",")[0]

    def t2ue_args(backbone: str, mode: str, captions: bool = False) -> tuple[str, ...]:
        extra = ("--set", f"generator={generators[backbone]['path']}", "--set", f"surrogate_weights={weights}", "--set", f"mode={mode}")
        return (*extra, "--captions", str(captions_file)) if captions else extra

    rows = [("clean", None, ()), ("random", "random", ())]
    for backbone in args.backbones.split(","):
        suffix = "" if backbone == default else f" ({backbone})"
        rows.append((f"t2ue class-wise{suffix}", "t2ue", t2ue_args(backbone, "classwise")))
    rows += [("t2ue sample-wise", "t2ue", t2ue_args(default, "samplewise")),
             ("t2ue from each image's caption", "t2ue", t2ue_args(default, "classwise", captions=True))]
    for name, method, extra in rows:
        key = f"row | {name} | {json.dumps(settings, sort_keys=True)}"
        if key in results:
            log(f"{name}: already measured")
            continue
        row: dict[str, Any] = {}
        data = clean_train
        if method is not None:
            folder = WORK / ("protected-" + "".join(ch if ch.isalnum() else "-" for ch in name))
            log(f"protecting: {name} ...")
            row["generation"] = generate(method, subset, folder, seed=0, extra=extra)
            data = load_pairs(folder, subset)[1]
        row["small_cnn"] = [
            train_classifier(build_classifier("small-cnn", len(classes), seed=seed), data, test,
                             TrainConfig(epochs=args.epochs), seed=seed).final
            for seed in range(args.seeds)
        ]
        row["clip"] = [victim_scores(data, train_captions, held_out, None, victim=args.victim, epochs=args.epochs, augment=True, seed=seed)
                       for seed in range(args.clip_seeds)]
        log(f"{name}: small CNN {mean_std(row['small_cnn'])}, {args.victim} {row['clip']}")
        results[key] = row
        out.write_text(json.dumps(results, indent=2))
    write_full_tables(results, settings, generators, surrogate_scores, held_out, args)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def write_full_tables(results: dict, settings: dict, generators: dict, surrogate: dict, held_out: HeldOutPairs,
                      args: argparse.Namespace) -> None:
    tag = json.dumps(settings, sort_keys=True)
    columns = ["data", "small CNN acc %", "CLIP zero-shot acc %", "CLIP image→text R@1/5/10 %", "CLIP text→image R@1/5/10 %",
               "generation s", "images/s", "PSNR dB", "SSIM"]
    rows, by_name = [], {}
    for key, row in results.items():
        kind, name, row_tag = key.split(" | ")
        if kind != "row" or row_tag != tag:
            continue
        clip, gen = row["clip"], row.get("generation")
        by_name[name] = row
        rows.append([
            name, mean_std(row["small_cnn"]), f"{100 * _mean([c['zero_shot'] for c in clip]):.1f}",
            _pct([_mean([c[f"image_to_text_r{k}"] for c in clip]) for k in RECALL_AT]),
            _pct([_mean([c[f"text_to_image_r{k}"] for c in clip]) for k in RECALL_AT]),
            f"{gen['seconds']:.0f}" if gen else None, f"{gen['images_per_s']:.0f}" if gen else None,
            f"{gen['psnr']:.2f}" if gen else None, f"{gen['ssim']:.3f}" if gen else None,
        ])
    print_markdown_table(columns, rows)
    default = generators[args.backbones.split(",")[0]]
    write_table(
        "p0-t2ue",
        title="`t2ue` from text alone: supervised and contrastive victims",
        command=command_line(),
        protocol=(f"P0 ({args.per_class}/class protected, test {args.test_per_class}/class); small CNN {args.epochs} epochs x "
                  f"{args.seeds} seeds; contrastive victim {args.victim} {args.epochs} epochs x {args.clip_seeds} seed(s), trained on "
                  f"each image's attribute caption, scored on {len(set(held_out.captions))} distinct held-out captions"),
        columns=columns, rows=rows, hardware=machine(), section=SECTION,
        notes=(f"Surrogate {args.surrogate} trained from scratch on CIFAR-10 train images 4000.. ({args.surrogate_per_class}/class, "
               f"disjoint from the protected ones) with attribute captions, {args.surrogate_epochs} epochs: zero-shot "
               f"{100 * surrogate['zero_shot']:.1f}%. Generator ({default['backbone']}, {settings}) trained on the same disjoint images "
               f"with their class prompts and attribute captions: {default['seconds']:.0f} s on this machine, "
               f"{default['parameters']:,} parameters; surrogate InfoNCE on its pairs {default['infonce_clean']:.3f} without noise, "
               f"{default['infonce_noisy']:.3f} with it; noise from text alone {default['noise_images_per_s']:.0f} images/s (32 px). "
               "Protection ran through `protect run t2ue`: class-wise = \"a photo of a {class}.\" and one code per class; "
               "sample-wise = a CLIP template per image and a code per image; from each image's caption = the attribute caption "
               "of each image (`--captions`), one code per caption. Chance is 10%."),
    )
    if len(generators) > 1:
        columns = ["backbone", "parameters", "generator training s", "noise from text images/s", "CLIP zero-shot acc %",
                   "CLIP image→text R@1 %", "small CNN acc %"]
        rows = []
        for backbone, facts in generators.items():
            name = "t2ue class-wise" if backbone == args.backbones.split(",")[0] else f"t2ue class-wise ({backbone})"
            row = by_name.get(name)
            if row is None:
                continue
            rows.append([backbone, f"{facts['parameters']:,}", f"{facts['seconds']:.0f}", f"{facts['noise_images_per_s']:.0f}",
                         f"{100 * _mean([c['zero_shot'] for c in row['clip']]):.1f}",
                         f"{100 * _mean([c['image_to_text_r1'] for c in row['clip']]):.1f}", mean_std(row["small_cnn"])])
        print_markdown_table(columns, rows)
        write_table(
            "p0-t2ue-backbones", title="`t2ue` text-to-noise backbones side by side: SSA-GAN blocks and a diffusers UNet",
            command=command_line(), protocol="P0 as in the table above; class-wise noise", columns=columns, rows=rows,
            hardware=machine(), section=SECTION,
            notes=f"Both trained with {settings} on the same pairs, one after the other on the same machine.",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="full", choices=("full", "factors"))
    parser.add_argument("--variants", default="", help="factors: comma list of factor rows (default: all)")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--per-class", type=int, default=1000, help="protected train images per class (P0: 1000)")
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15, help="victim epochs (supervised and contrastive)")
    parser.add_argument("--surrogate", default="clip-tiny", choices=sorted(CONTRASTIVE_VICTIMS))
    parser.add_argument("--surrogate-per-class", type=int, default=1000, help="disjoint pairs: train images 4000.. per class")
    parser.add_argument("--surrogate-epochs", type=int, default=30)
    parser.add_argument("--gen", default="", help="full: generator training keys over the factors' base, e.g. "
                        "'learner=bilevel,augment=true,epochs=20'")
    parser.add_argument("--backbones", default="ssa", help="full: comma list of generator backbones (name or name@width, e.g. "
                        "unet@64), the first one for every row")
    parser.add_argument("--clip-seeds", type=int, default=1, help="full: seeds of the contrastive victim")
    parser.add_argument("--victim", default="clip-tiny", choices=sorted(CONTRASTIVE_VICTIMS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    args = parser.parse_args()

    cifar = args.shared / "data" / "cifar10"
    if not cifar.is_dir():
        sys.exit(f"{cifar} not found: P0 needs the shared CIFAR-10 folder")
    torch.set_num_threads(args.threads)
    if args.mode == "factors":
        run_factors(args, lambda text: print(text, file=sys.stderr, flush=True))
    else:
        run_full(args, lambda text: print(text, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()

"""Protocol P0 for T2UE (Ma et al., arXiv:2508.03091) with template captions: clean vs random
vs t2ue class-wise and sample-wise, for the supervised small-CNN victim and a contrastive victim
(a small CLIP trained from scratch, retrieval recall on clean test pairs).

No pretrained CLIP is available offline, so the surrogate is a small CLIP trained here from
scratch on CIFAR-10 train images 4000-4999 of every class (disjoint from the protected first
1000) with template captions; the generator is trained on those same disjoint pairs, so it never
sees the images it protects (zero contact). Protection runs through the real CLIP
(`protect run t2ue`); victims train on the written files. Prints a Markdown table, writes JSON.

    python benchmarks/p0_t2ue.py                                         # full P0
    python benchmarks/p0_t2ue.py --per-class 100 --seeds 1 --epochs 5    # a quick look
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


def train_surrogate(data: Path, name: str, epochs: int, path: Path, classes: list[str]) -> dict:
    """A CLIP trained from scratch on (image, template caption) pairs; each image gets template
    i mod T so the text tower sees every template. Reused when ``path`` exists."""
    if path.exists():
        return {"reused": True}
    pairs = load_image_folder(data, classes=classes)
    captions = [CLIP_TEMPLATES[i % len(CLIP_TEMPLATES)].format(classes[int(y)]) for i, y in enumerate(pairs.labels)]
    clip = build_clip_victim(name, seed=1234)
    result = train_clip(clip, pairs.images, captions, ClipTrainConfig(epochs=epochs), seed=1234)
    save_clip(clip, path)
    return {"seconds": result.seconds, "losses": result.losses, "pairs": len(pairs)}


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
    "bi-level + augment, caption z": {"learner": "bilevel", "augment": True, "codes": "caption"},
    "frozen+bi-level + augment": {"learner": "frozen+bilevel", "augment": True},
}
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
    weights = WORK / f"surrogate-{args.surrogate}-captions-{args.surrogate_per_class}-{args.surrogate_epochs}.safetensors"
    surrogate = train_caption_surrogate(args.surrogate, disjoint, args.surrogate_epochs, weights, log)
    surrogate_scores = held_out.score(surrogate)
    log(f"surrogate zero-shot {surrogate_scores['zero_shot']:.3f}")
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
        noise = noisy_test = None
        if name == "random class-wise":
            noise, test_noise = random_classwise_noise(classes, clean_train.labels, eps), random_classwise_noise(classes, test.labels, eps)
        elif name != "clean":
            config = T2UETrainConfig(clip_model=CONTRASTIVE_VICTIMS[args.surrogate], clip_weights=str(weights),
                                     templates=["a photo of a {}."], **row["settings"])
            slug = "-".join(f"{k}{v}" for k, v in sorted(row["settings"].items()))
            started = time.perf_counter()
            trained = train_generator(pairs, config, WORK / f"factor-{args.surrogate}-{args.surrogate_per_class}-{slug}", clip=surrogate,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="full", choices=("full", "factors"))
    parser.add_argument("--variants", default="", help="factors: comma list of factor rows (default: all)")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "p0_t2ue")
    parser.add_argument("--per-class", type=int, default=1000, help="protected train images per class (P0: 1000)")
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15, help="victim epochs (supervised and contrastive)")
    parser.add_argument("--surrogate", default="clip-tiny", choices=sorted(CONTRASTIVE_VICTIMS))
    parser.add_argument("--surrogate-per-class", type=int, default=1000, help="disjoint pairs: train images 4000.. per class")
    parser.add_argument("--surrogate-epochs", type=int, default=30)
    parser.add_argument("--gen-epochs", type=int, default=30)
    parser.add_argument("--gen-width", type=int, default=128, help="generator base width (paper 512)")
    parser.add_argument("--gen-lr", type=float, default=1e-3, help="Adam lr (paper 1e-4 over 500 epochs; ours 1e-3 for 30)")
    parser.add_argument("--victim", default="clip-tiny", choices=sorted(CONTRASTIVE_VICTIMS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: every core)")
    args = parser.parse_args()

    cifar = args.shared / "data" / "cifar10"
    if not cifar.is_dir():
        sys.exit(f"{cifar} not found: P0 needs the shared CIFAR-10 folder")
    torch.set_num_threads(args.threads)
    if args.mode == "factors":
        run_factors(args, lambda text: print(text, file=sys.stderr, flush=True))
        return
    work = args.work
    subset = build_subset(cifar / "train", work / f"train-first{args.per_class}", args.per_class)
    disjoint = build_subset(cifar / "train", work / f"train-4000-{args.surrogate_per_class}", args.surrogate_per_class, offset=4000)
    test = load_image_folder(cifar / "test", per_class=args.test_per_class)
    classes = test.classes
    test_captions = class_caption_list(test.labels, classes)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

    weights = work / f"surrogate-{args.surrogate}-{args.surrogate_per_class}-{args.surrogate_epochs}.safetensors"
    log(f"surrogate {args.surrogate} on {disjoint} ...")
    surrogate = train_surrogate(disjoint, args.surrogate, args.surrogate_epochs, weights, classes)
    clip = load_clip(CONTRASTIVE_VICTIMS[args.surrogate], weights=str(weights))
    surrogate["zero_shot_recall"] = retrieval_recall(clip, test.images, test_captions)

    gen_dir = work / f"generator-{args.surrogate}-w{args.gen_width}-e{args.gen_epochs}-lr{args.gen_lr:g}"
    config = T2UETrainConfig(clip_model=CONTRASTIVE_VICTIMS[args.surrogate], clip_weights=str(weights), width=args.gen_width,
                             epochs=args.gen_epochs, lr=args.gen_lr)
    log(f"generator ({args.gen_epochs} epochs) ...")
    pairs = pairs_from_folder(disjoint, config.resolution, config.templates)
    started = time.perf_counter()
    trained = train_generator(pairs, config, gen_dir, clip=clip)
    seconds = time.perf_counter() - started
    loaded = load_generator(trained.generator, clip_weights=str(weights))
    generator_facts = {"seconds": seconds, "first_loss": trained.epoch_losses[0],
                       "last_loss": trained.epoch_losses[-1], "noise_images_per_s": noise_throughput(loaded),
                       "infonce_clean": infonce_of(loaded.net, clip, pairs, config.eps, with_noise=False),
                       "infonce_noisy": infonce_of(loaded.net, clip, pairs, config.eps)}

    t2ue_args = ("--set", f"generator={trained.generator}", "--set", f"surrogate_weights={weights}")
    data = {"clean": {"train": load_image_folder(subset, classes=classes)}}
    for name, method, extra in (("random", "random", ()), ("t2ue class-wise", "t2ue", (*t2ue_args, "--set", "mode=classwise")),
                                ("t2ue sample-wise", "t2ue", (*t2ue_args, "--set", "mode=samplewise"))):
        out = work / name.replace(" ", "-")
        log(f"protecting: {name} ...")
        gen = generate(method, subset, out, seed=0, extra=extra)
        data[name] = {"train": load_pairs(out, subset)[1], "gen": gen}

    results = {}
    for name, row in data.items():
        train = row["train"]
        finals = []
        for seed in range(args.seeds):
            model = build_classifier("small-cnn", len(classes), seed=seed)
            finals.append(train_classifier(model, train, test, TrainConfig(epochs=args.epochs), seed=seed).final)
        contrastive = contrastive_cell(args.victim, train.images, class_caption_list(train.labels, classes), test.images,
                                       test_captions, epochs=args.epochs, seed=0)
        results[name] = {"small_cnn": finals, "contrastive": contrastive["recall"], "contrastive_seconds": contrastive["seconds"],
                         "generation": row.get("gen")}
        log(f"{name}: small CNN {mean_std(finals)}, {args.victim} recall {contrastive['recall']}")

    document = {"args": {k: str(v) for k, v in vars(args).items()}, "surrogate": surrogate, "generator": generator_facts, "results": results}
    (work / "results.json").write_text(json.dumps(document, indent=2, default=str))
    print(f"\nProtocol P0 (T2UE, template captions): {args.per_class}/class protected, test {args.test_per_class}/class, "
          f"small CNN {args.epochs} epochs x {args.seeds} seed(s), {args.victim} {args.epochs} epochs, {torch.get_num_threads()} threads")
    print(f"surrogate {args.surrogate} trained from scratch on {args.surrogate_per_class}/class disjoint pairs "
          f"({args.surrogate_epochs} epochs): zero-shot acc {100 * surrogate['zero_shot_recall']['image_to_text_r1']:.1f}%")
    print(f"generator: width {args.gen_width}, {args.gen_epochs} epochs, {generator_facts['seconds']:.0f} s, InfoNCE "
          f"{generator_facts['first_loss']:.3f} -> {generator_facts['last_loss']:.3f} (training epochs); on its pairs without / with "
          f"noise {generator_facts['infonce_clean']:.3f} / {generator_facts['infonce_noisy']:.3f}; "
          f"noise from text: {generator_facts['noise_images_per_s']:.0f} images/s\n")
    header = ("| data | small CNN acc % | CLIP zero-shot acc % | i->t R@1/5/10 % | t->i R@1/5/10 % | gen time s | gen img/s | PSNR dB |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, entry in results.items():
        recall, gen = entry["contrastive"], entry["generation"] or {}
        print("| " + " | ".join([
            name, mean_std(entry["small_cnn"]), f"{100 * recall['image_to_text_r1']:.1f}",
            "/".join(f"{100 * recall[f'image_to_text_r{k}']:.1f}" for k in (1, 5, 10)),
            "/".join(f"{100 * recall[f'text_to_image_r{k}']:.1f}" for k in (1, 5, 10)),
            f"{gen['seconds']:.0f}" if gen else "-", f"{gen['images_per_s']:.0f}" if gen else "-",
            f"{gen['psnr']:.2f}" if gen else "-",
        ]) + " |")


if __name__ == "__main__":
    main()

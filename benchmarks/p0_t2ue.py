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

import torch

from attacks.contrastive import (
    CONTRASTIVE_VICTIMS,
    ClipTrainConfig,
    build_clip_victim,
    class_caption_list,
    contrastive_cell,
    retrieval_recall,
    save_clip,
    train_clip,
)
from attacks.data import load_image_folder, load_pairs
from attacks.train import TrainConfig, train_classifier
from protect.models import build_classifier
from protect.models.clip import load_clip
from protect.t2ue import (
    CLIP_TEMPLATES,
    LoadedGenerator,
    T2UETrainConfig,
    code_for,
    infonce_of,
    load_generator,
    noise_from_text,
    pairs_from_folder,
    train_generator,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from p0 import build_subset, generate, mean_std  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

"""Protocol P0 for the label-agnostic method: clusters vs em-classwise vs random, small-CNN
victims trained with the true labels and with a coarse relabelling (animals vs vehicles,
configs/relabel/cifar10-coarse.yaml), 3 seeds; generation time and peak memory.

No pretrained CLIP is available offline here, so ``clusters`` uses a surrogate trained in this
script on data disjoint from the protected subset: a small CNN trained on CIFAR-10 train
images 4000-4999 of every class (sorted by name; the protected subset is images 0-999).

    python benchmarks/p0_clusters.py --reuse                          # full P0
    python benchmarks/p0_clusters.py --per-class 100 --seeds 1 --epochs 5 --cluster-epochs 2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from attacks.data import ImageSet, load_image_folder, load_pairs
from attacks.relabel import relabel_sets
from attacks.train import TrainConfig, train_classifier
from attacks.verify import victim_train_config
from protect.models import build_classifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from p0 import build_subset, generate, mean_std, recorded_generation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COARSE = ROOT / "configs" / "relabel" / "cifar10-coarse.yaml"


def train_surrogate(cifar: Path, work: Path, test: ImageSet, epochs: int) -> tuple[Path, dict]:
    """A small CNN trained on train images 4000-4999 per class; its weights as safetensors."""
    weights = work / "surrogate-small-cnn-4000-4999.safetensors"
    if weights.exists():
        return weights, json.loads(weights.with_suffix(".json").read_text())
    data = load_image_folder(build_subset(cifar / "train", work / "surrogate-train", 1000, offset=4000), classes=test.classes)
    model = build_classifier("small-cnn", len(test.classes), seed=0)
    result = train_classifier(model, data, test, TrainConfig(epochs=epochs), seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    facts = {"train_images": len(data), "epochs": epochs, "test_accuracy": result.final, "seconds": result.seconds}
    weights.with_suffix(".json").write_text(json.dumps(facts))
    return weights, facts


def victims(train: ImageSet, test: ImageSet, seeds: int, epochs: int) -> dict:
    finals, peaks, seconds = [], [], []
    for seed in range(seeds):
        model = build_classifier("small-cnn", len(test.classes), seed=seed)
        result = train_classifier(model, train, test, victim_train_config("small-cnn", epochs, len(train)), seed=seed)
        finals.append(result.final)
        peaks.append(result.peak)
        seconds.append(result.seconds)
    return {"final": finals, "peak": peaks, "train_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=None, help="default: benchmarks/results/p0 (1000/class) or p0-N")
    parser.add_argument("--methods", default="clusters,em-classwise,random")
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15, help="victim epochs")
    parser.add_argument("--surrogate-epochs", type=int, default=15)
    parser.add_argument("--cluster-epochs", type=int, default=10, help="generator epochs per cluster (official 50)")
    parser.add_argument("--eps", default="8/255", help="clusters budget (P0: 8/255; the paper's 16/255 also works)")
    parser.add_argument("--reuse", action="store_true", help="reuse protected folders that exist (em-classwise, random)")
    args = parser.parse_args()

    cifar = args.shared / "data" / "cifar10"
    if not cifar.is_dir():
        sys.exit(f"{cifar} not found: P0 needs the shared CIFAR-10 folder")
    work = args.work or ROOT / "benchmarks" / "results" / ("p0" if args.per_class == 1000 else f"p0-{args.per_class}")
    torch.set_num_threads(os.cpu_count() or 1)
    subset = build_subset(cifar / "train", work / "train-subset", args.per_class)
    test = load_image_folder(cifar / "test", per_class=args.test_per_class)
    started = time.perf_counter()
    weights, surrogate = train_surrogate(cifar, work, test, args.surrogate_epochs)
    print(f"surrogate: small CNN on train images 4000-4999/class, test acc {surrogate['test_accuracy']:.3f}", file=sys.stderr)

    results_path = work / "results-clusters.json"
    earlier = json.loads(results_path.read_text()) if results_path.exists() else {}
    sets: dict[str, ImageSet] = {}
    generation: dict[str, dict] = {}
    for method in [m for m in args.methods.split(",") if m]:
        out = work / method
        if args.reuse and (out / "protection.json").exists() and method != "clusters":
            generation[method] = recorded_generation(out, (earlier.get(method) or {}).get("generation"))
        elif method == "clusters":
            settings = {"surrogate": "small-cnn", "surrogate_weights": weights, "resolution": 32, "eps": args.eps,
                        "epochs": args.cluster_epochs}
            extra = tuple(arg for key, value in settings.items() for arg in ("--set", f"{key}={value}"))
            generation[method] = {**generate(method, subset, out, 0, extra), "settings": {k: str(v) for k, v in settings.items()}}
        else:
            generation[method] = generate(method, subset, out, seed=0)
        clean, sets[method] = load_pairs(out, subset)
        sets.setdefault("clean", clean)

    sets = {"clean": sets.pop("clean"), **sets}  # relabel_sets takes the clean set first
    results: dict[str, dict] = {}
    for labelling in ("true", f"coarse:{COARSE}"):
        names = list(sets)
        relabelled, relabelled_test = relabel_sets(labelling, [sets[n] for n in names], test)
        for name, train in zip(names, relabelled):
            key = f"{name} / {'true labels' if labelling == 'true' else 'coarse (animal vs vehicle)'}"
            print(f"training victims: {key}", file=sys.stderr, flush=True)
            results[key] = {**victims(train, relabelled_test, args.seeds, args.epochs), "generation": generation.get(name),
                            "classes": len(relabelled_test.classes)}
    results_path.write_text(json.dumps({"surrogate": surrogate, **results}, indent=2, default=str))

    print(f"\nProtocol P0 ({args.per_class}/class train, {args.test_per_class}/class test), small CNN, {args.seeds} seed(s), "
          f"{args.epochs} epochs, {torch.get_num_threads()} threads; clusters: surrogate small CNN trained on disjoint "
          f"images, eps {args.eps}, {args.cluster_epochs} generator epochs; total {time.perf_counter() - started:.0f} s\n")
    print("| data / victim labels | classes | test acc % (final) | peak % | gen time s | gen peak RSS MiB | PSNR dB |")
    print("|---|---|---|---|---|---|---|")
    for key, entry in results.items():
        gen = entry["generation"] or {}
        rss = f"{gen['peak_rss_mib']:.0f}" if gen.get("peak_rss_mib") else "-"
        print(f"| {key} | {entry['classes']} | {mean_std(entry['final'])} | {mean_std(entry['peak'])} | "
              f"{gen['seconds']:.0f} | {rss} | {gen['psnr']:.2f} |" if gen else
              f"| {key} | {entry['classes']} | {mean_std(entry['final'])} | {mean_std(entry['peak'])} | - | - | - |")


if __name__ == "__main__":
    main()

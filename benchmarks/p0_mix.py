"""Protocol P0, section "Mixing" (../shared/PROTOCOL.md): protected data mixed with clean data.

For each clean fraction F a small-CNN victim (15 epochs, 3 seeds, with and without augmentation)
trains on
- the mixed set: F*N clean images plus the protected copies of the other images (every image once),
- the clean part only: those F*N clean images alone,
- all N images clean.
The last two do not depend on the method and are trained once for all. F = 0 is the fully
protected set. Protected data that helps the victim (mixed above clean part only) still gives a
scraper value; the Bayes-error method claims the opposite. Victims use the `protect verify`
recipe (attacks.verify.victim_train_config: batch ~N/20 up to 512, so a smaller clean part still
gets ~20 steps an epoch). Generation runs through `protect run` (wall time, steps, peak RSS).
Every finished victim run is kept under WORK/cells, so an interrupted benchmark resumes.

    python benchmarks/p0_mix.py                                    # all of it: hours on 2 cores
    python benchmarks/p0_mix.py --methods bayes --fractions 0.5    # the acceptance check first
    python benchmarks/p0_mix.py --methods bayes --set bayes.sigma=0.1 --tag sigma0.1   # a variant
    python benchmarks/p0_mix.py --per-class 250 --seeds 1 ...      # a quick look (no table stored)
    python benchmarks/p0_mix.py --scaling                          # the estimator's cost as N doubles
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from attacks.data import ImageSet, clean_part, load_image_folder, load_pairs, mix_with_clean
from attacks.train import train_classifier
from attacks.verify import victim_train_config
from protect.models import build_classifier
from protect.training_state import tensor_fingerprint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from p0 import build_subset, generate  # noqa: E402
from tables import command_line, machine, print_markdown_table, write_table  # noqa: E402

VICTIM = "small-cnn"


def _cell(work: Path, name: str, train: ImageSet, test: ImageSet, *, augment: bool, seed: int, epochs: int) -> dict:
    """One victim run, or its stored result when the same data was trained before."""
    path = work / "cells" / f"{name}-aug{int(augment)}-seed{seed}-e{epochs}.json"
    fingerprint = tensor_fingerprint(train.images, train.labels)
    if path.exists():
        stored = json.loads(path.read_text())
        if stored["data_fingerprint"] == fingerprint:
            return stored
    config = dataclasses.replace(victim_train_config(VICTIM, epochs, len(train)), augment=augment)
    result = train_classifier(build_classifier(VICTIM, len(test.classes), seed=seed), train, test, config, seed=seed)
    stored = {"final": result.final, "peak": result.peak, "seconds": result.seconds, "images": len(train),
              "data_fingerprint": fingerprint, "augment": augment, "seed": seed, "epochs": epochs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored))
    print(f"{path.stem}: final {100 * result.final:.2f}% ({result.seconds:.0f} s, {len(train)} images)", file=sys.stderr, flush=True)
    return stored


def _protected_set(method: str, label: str, overrides: list[str], subset: Path, work: Path, regenerate: bool) -> tuple[ImageSet, ImageSet, dict]:
    """Generate (or reuse) the method's protected copy of the subset; return it aligned with the
    clean originals, and the generation figures."""
    out = work / label
    record = out / "generation.json"
    if regenerate or not record.exists() or not (out / "protection.json").exists():
        print(f"generating {label} ...", file=sys.stderr, flush=True)
        extra = tuple(arg for setting in overrides for arg in ("--set", setting))
        gen = generate(method, subset, out, seed=0, extra=extra)
        record.write_text(json.dumps(gen, default=str))
    gen = json.loads(record.read_text())
    clean, protected = load_pairs(out, subset)
    return clean, protected, gen


def _steps_run(fit: dict) -> str:
    for key in ("steps_run", "rounds_run"):
        if key in fit:
            return str(fit[key])
    return "–"


def _pct(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def _effect(mixed: list[float], part: list[float]) -> str:
    change = statistics.mean(mixed) - statistics.mean(part)
    spread = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in (mixed, part))
    word = "unclear" if abs(change) <= spread else "worse" if change < 0 else "better"
    return f"{word} ({100 * change:+.2f})"


def run_mixing(args: argparse.Namespace) -> None:
    cifar = args.shared / "data" / "cifar10"
    if not cifar.is_dir():
        sys.exit(f"{cifar} not found: P0 needs the shared CIFAR-10 folder")
    torch.set_num_threads(os.cpu_count() or 1)
    work = args.work if args.per_class == 1000 else args.work.with_name(f"{args.work.name}-{args.per_class}")
    subset = build_subset(cifar / "train", work / "train-subset", args.per_class)
    test = load_image_folder(cifar / "test", per_class=200)
    fractions = [float(f) for f in args.fractions.split(",")]
    augments = [{"on": True, "off": False}[a] for a in args.augment.split(",")]
    seeds = range(args.seeds)
    overrides: dict[str, list[str]] = {}
    for setting in args.set:
        method, _, rest = setting.partition(".")
        overrides.setdefault(method, []).append(rest)

    def runs(name: str, train: ImageSet, augment: bool) -> list[float]:
        return [_cell(work, name, train, test, augment=augment, seed=s, epochs=args.epochs)["final"] for s in seeds]

    mix_rows, full_rows, gen_rows = [], [], []
    for method in [m for m in args.methods.split(",") if m]:
        label = method + (f"-{args.tag}" if args.tag and method in overrides else "")
        clean, protected, gen = _protected_set(method, label, overrides.get(method, []), subset, work, args.regenerate)
        gen_rows.append([label, round(gen["seconds"]), round(gen["fit_seconds"] or 0), _steps_run(gen["fit"]),
                         round(gen["peak_rss_mib"]) if gen.get("peak_rss_mib") else None, gen["psnr"]])
        full_row = [label]
        for augment in augments:
            everything = runs("all-clean", clean, augment)
            for fraction in fractions:
                if fraction == 0:
                    full_row += [_pct(runs(f"{label}-protected", protected, augment)), _pct(everything)]
                    continue
                # seed s mixes with mix_with_clean(..., seed=s); its clean part is the same images alone
                mixed = [_cell(work, f"{label}-mix{fraction}", mix_with_clean(protected, clean, fraction, s), test,
                               augment=augment, seed=s, epochs=args.epochs)["final"] for s in seeds]
                part = [_cell(work, f"clean-part{fraction}", clean_part(clean, fraction, s), test,
                              augment=augment, seed=s, epochs=args.epochs)["final"] for s in seeds]
                mix_rows.append([label, f"{fraction:.0%}", "yes" if augment else "no", _pct(mixed), _pct(part),
                                 _pct(everything), _effect(mixed, part)])
        if 0 in fractions:
            full_rows.append(full_row)

    protocol = f"P0 mixing, small-CNN victim, {args.epochs} epochs, {args.seeds} seeds"
    suffix = "-" + re.sub(r"[^a-z0-9-]+", "-", args.tag.lower()) if args.tag else ""
    victims = [f"{kind}, {'augmented' if augment else 'no augmentation'}" for augment in augments for kind in ("protected", "all clean")]
    tables = [
        (f"p0-mix{suffix}", "Mixed with clean data: mixed vs clean part only vs all clean (clean test accuracy %)",
         ["method", "clean fraction", "augmentation", "mixed", "clean part only", "all clean", "protected part made it"],
         mix_rows, "Mixed: the clean fraction of the images plus the protected copies of the rest; clean part only: "
         "those clean images alone; 'protected part made it': mixed minus clean part only, in points, 'unclear' "
         "when within the larger seed-to-seed standard deviation."),
        (f"p0-mix-full{suffix}", "100% protected (clean test accuracy %)", ["method", *victims], full_rows, ""),
        (f"p0-mix-generation{suffix}", f"Generation of the protected sets ({10 * args.per_class:,} images)",
         ["method", "wall s", "fit s", "steps / rounds", "peak RSS MiB", "PSNR dB"], gen_rows,
         "Wall time of `protect run` (reading, fitting, writing the PNGs); peak RSS of that process."),
    ]
    for name, title, columns, rows, notes in tables:
        if not rows:
            continue
        print(f"\n### {title}\n")
        print_markdown_table(columns, rows)
        if args.per_class == 1000 and args.store:
            write_table(name, title=title, command=command_line(), protocol=protocol, columns=columns, rows=rows,
                        hardware=machine(), notes=notes, section="P0: mixed with clean data")


def _estimator_cost(n: int, dim: int, chunk: int, queue: multiprocessing.Queue) -> None:
    """In a fresh process: time the estimate and its full-set gradient on N random features, and
    the extra peak memory it needs above holding the features."""
    from protect.methods.bayes import scaled_bayes_error_gradient

    torch.set_num_threads(os.cpu_count() or 1)
    gen = torch.Generator().manual_seed(0)
    features = torch.rand(n, dim, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    scaled_bayes_error_gradient(features[:500], labels[:500], 10, 0.3, chunk_size=chunk)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(3):
        started = time.perf_counter()
        scaled_bayes_error_gradient(features, labels, 10, 0.3, chunk_size=chunk)
        times.append(time.perf_counter() - started)
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    queue.put((statistics.median(times), extra))


def run_scaling(args: argparse.Namespace) -> None:
    """The estimator's cost per outer step as N doubles: time ~N^2, memory ~N (for a fixed chunk)."""
    context = multiprocessing.get_context("spawn")
    rows = []
    for dim in (64, 512):
        for n in (2500, 5000, 10000):
            queue = context.Queue()
            process = context.Process(target=_estimator_cost, args=(n, dim, args.chunk_size, queue))
            process.start()
            seconds, extra_mib = queue.get()
            process.join()
            rows.append([dim, n, round(seconds, 3), round(extra_mib)])
            print(f"D={dim} N={n}: {seconds:.3f} s, +{extra_mib:.0f} MiB", file=sys.stderr, flush=True)
    columns = ["feature dim", "images N", "seconds (median of 3)", "extra peak memory MiB"]
    print_markdown_table(columns, rows)
    if args.store:
        write_table("p0-bayes-estimator-cost", title="bayes: the estimator's cost per outer step as N doubles",
                    command=command_line(), protocol="estimator only, random features",
                    columns=columns, rows=rows, hardware=machine(precision="fp32"), section="P0: mixed with clean data",
                    notes=f"Estimate plus full-set gradient on N random features, {args.chunk_size} rows per chunk, "
                          "float32; extra peak memory is the rise of the process's peak RSS above holding the "
                          "features. D = 64 is the small CNN's feature size, 512 the ResNet-18's.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "p0-mix")
    parser.add_argument("--per-class", type=int, default=1000, help="train images per class (P0: 1000)")
    parser.add_argument("--methods", default="bayes,em-samplewise,random")
    parser.add_argument("--fractions", default="0,0.2,0.5,0.8", help="clean fractions; 0 = fully protected")
    parser.add_argument("--augment", default="on,off", help="victim augmentation: on, off or both")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="a setting for one method's generation, e.g. bayes.steps=20 (repeatable)")
    parser.add_argument("--tag", default="", help="names the folders and tables of methods generated with --set")
    parser.add_argument("--regenerate", action="store_true", help="generate again even when a protected folder exists")
    parser.add_argument("--no-store", dest="store", action="store_false", help="print the tables without storing them")
    parser.add_argument("--scaling", action="store_true", help="measure only the estimator's cost as N doubles")
    parser.add_argument("--chunk-size", type=int, default=256)
    args = parser.parse_args()
    if args.set and not args.tag:
        parser.error("--set needs --tag, so that a variant's folders and tables do not replace the defaults'")
    if not all(re.fullmatch(r"[\w-]+\.\w+=.+", s) for s in args.set):
        parser.error("--set takes METHOD.KEY=VALUE, e.g. bayes.steps=20")
    run_scaling(args) if args.scaling else run_mixing(args)


if __name__ == "__main__":
    main()

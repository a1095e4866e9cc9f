"""em-samplewise's fast path against the paper's loop on P0: generation time side by side and
the victim's accuracy on the fast path's noise.

The two fits alternate (paper, fast, paper, fast, ...) in fresh processes on the same 10,000
images, so a drift in the machine's speed hits both; the table gives each one's median fit time
and the median of the pairwise ratios. Victims: the small CNN, 15 epochs, one run per seed, on
the fast path's noise (and on the paper's with ``--paper-victims``; otherwise the stored P0
table's em-samplewise row is the reference).

    python benchmarks/p0_em_fast.py                      # 3 pairs, 3 victim seeds
    python benchmarks/p0_em_fast.py --repeats 1 --seeds 1 --set exit_loss=0.1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from p0 import p0_data  # noqa: E402
from speed import run_child  # noqa: E402
from tables import command_line, print_markdown_table, write_table  # noqa: E402

METHOD = "em-samplewise"


def protected_images(sets: list[str], subset: Path, per_class: int, state_file: Path, method: str = METHOD):
    """The P0 train subset with the noise of a finished fit of ``method`` (its state file) added."""
    from safetensors.torch import load_file

    from attacks.data import ImageSet, load_image_folder
    from protect.budget import perturb_uint8
    from protect.config import parse_overrides
    from protect.generator import Batch, bounded_perturbation, create_generator, resolve_config

    config = resolve_config(method, overrides=parse_overrides(sets))
    data = load_image_folder(subset, size=config.resolution, per_class=per_class)
    generator = create_generator(method, config, seed=0)
    generator.load_state_dict(load_file(str(state_file)))
    index = torch.arange(len(data))
    with torch.no_grad():
        delta = bounded_perturbation(generator, Batch(images=data.images.float().div(255), labels=data.labels, indices=index))
    return ImageSet(perturb_uint8(data.images, delta, config.eps), data.labels, data.classes, data.paths)


def victim_accuracies(train, test, seeds: int, countermeasure: str = "none") -> list[float]:
    """Final test accuracy % of small-CNN victims (15 epochs) trained on ``train`` with ``countermeasure``."""
    from attacks.countermeasures import build_countermeasure
    from attacks.train import TrainConfig, train_classifier
    from protect.models import build_classifier

    attack = build_countermeasure(countermeasure)
    return [100 * train_classifier(build_classifier("small-cnn", len(test.classes), seed=seed), train, test,
                                   TrainConfig(epochs=15), seed=seed, data_transform=attack.data_transform,
                                   batch_loss=attack.batch_loss).final for seed in range(seeds)]


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "p0")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of fits (paper, fast)")
    parser.add_argument("--seeds", type=int, default=3, help="victim seeds")
    parser.add_argument("--paper-victims", action="store_true", help="also train victims on the paper loop's noise")
    parser.add_argument("--per-class", type=int, default=1000, help="train images per class (P0: 1,000)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an option of the fast path's run")
    parser.add_argument("--table", default="p0-em-samplewise-fast")
    args = parser.parse_args()

    subset, test = p0_data(args.shared, args.work)
    runs = {"paper loop (fast=false)": ["fast=false"], "fast path (defaults)": list(args.set)}
    n = 10 * args.per_class
    fits: dict[str, list[dict]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        states = {name: Path(tmp) / f"{i}.safetensors" for i, name in enumerate(runs)}
        for repeat in range(args.repeats):
            for name, sets in runs.items():
                fit = run_child("fit", METHOD, sets, subset, n, states[name])
                if "error" in fit:
                    sys.exit(f"{name}: {fit['error']}")
                fits[name].append(fit)
                print(f"{name} fit {repeat + 1}: {fit['seconds']:.1f} s, {fit['fit']}", file=sys.stderr, flush=True)
        victims = {name: victim_accuracies(protected_images(sets, subset, args.per_class, states[name]), test, args.seeds)
                   for name, sets in runs.items() if args.paper_victims or name != "paper loop (fast=false)"}

    paper, fast = (fits[name] for name in runs)
    ratios = [p["seconds"] / f["seconds"] for p, f in zip(paper, fast)]
    columns = ["run", "fit s (median)", "fit s (each)", "PGD image-steps", "rounds", "speed-up (median of pairs)",
               "small CNN test acc %"]
    rows = []
    for name, runs_of in fits.items():
        seconds = [r["seconds"] for r in runs_of]
        rows.append([name, f"{statistics.median(seconds):.0f}", ", ".join(f"{s:.0f}" for s in seconds),
                     runs_of[-1]["fit"].get("pgd_image_steps"), runs_of[-1]["fit"].get("rounds_run"),
                     f"{statistics.median(ratios):.2f}x" if runs_of is fast else "1x",
                     mean_sd(victims[name]) if name in victims else "–"])
    print_markdown_table(columns, rows)
    write_table(args.table, title="em-samplewise: fast path against the paper's loop (P0)", command=command_line(),
                protocol="P0", columns=columns, rows=rows,
                notes=f"Fits alternate in fresh processes on {n:,} P0 images (fit only: no file I/O), "
                      f"{args.repeats} pairs; victims: small CNN, 15 epochs, {args.seeds} seeds.")


if __name__ == "__main__":
    main()

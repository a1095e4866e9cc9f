"""Protocol P0 (../shared/PROTOCOL.md): clean vs each method, small-CNN victim, 3 seeds,
optionally with part of the protected set replaced by the clean originals (``--mix``).

Generation runs through the real CLI (`protect run`) on a folder of the P0 train subset;
victims train on the written files. Prints a Markdown table, writes the raw numbers to
benchmarks/results/p0/results.json and stores the table for docs/results.md
(benchmarks/results/tables/<--table>.json).

    python benchmarks/p0.py                                  # random, em-classwise, em-samplewise
    python benchmarks/p0.py --methods bayes,em-samplewise,random --mix 0,0.5,0.8 --reuse
    python benchmarks/p0.py --seeds 1 --epochs 5             # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from attacks.data import load_image_folder, load_pairs, mix_with_clean
from attacks.train import TrainConfig, train_classifier
from protect.models import build_classifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from tables import command_line, print_markdown_table, write_table  # noqa: E402


def build_subset(source: Path, dest: Path, per_class: int, offset: int = 0) -> Path:
    """A folder of symlinks: ``per_class`` files (sorted by name, from position ``offset``) of every class.
    The links lead out of the folder, so `protect run` reads it with ``--allow-outside``."""
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        target = dest / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(class_dir.iterdir())[offset : offset + per_class]:
            link = target / path.name
            if not link.exists():
                link.unlink(missing_ok=True)  # a dangling link from a relative source path
                link.symlink_to(path.resolve())
    return dest


def p0_data(shared: Path, work: Path):
    """The P0 train subset (a folder of links under ``work``) and the 2,000-image clean test set,
    or exit naming the missing CIFAR-10 folder."""
    cifar = shared / "data" / "cifar10"
    if not cifar.is_dir():
        sys.exit(f"{cifar} not found: P0 needs the shared CIFAR-10 folder")
    return build_subset(cifar / "train", work / "train-subset", 1000), load_image_folder(cifar / "test", per_class=200)


def generate(method: str, subset: Path, out: Path, seed: int, extra: tuple[str, ...] = ()) -> dict:
    """Run `protect run` (with ``extra`` arguments) in a child process; wall time and the child's peak RSS."""
    cmd = [sys.executable, "-m", "protect.cli", "run", method, str(subset), str(out), "--seed", str(seed), "--overwrite",
           "--allow-outside", *extra]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    stderr = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"protect run {method} failed:\n{stderr}")
    record = json.loads((out / "protection.json").read_text())
    return {
        "seconds": seconds,
        "fit_seconds": record["fit"].get("seconds"),
        "fit": record["fit"],
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "images_per_s": record["summary"]["written"] / seconds,
        "psnr": record["summary"]["mean_psnr_db"],
        "ssim": record["summary"]["mean_ssim"],
    }


def recorded_generation(out: Path, earlier: dict | None) -> dict:
    """Generation figures of an earlier run: as measured then (``earlier``, from results.json),
    or from its protection.json, which does not record peak memory."""
    if earlier:
        return {**earlier, "reused": True}
    record = json.loads((out / "protection.json").read_text())
    summary = record["summary"]
    return {
        "seconds": summary.get("seconds"),
        "fit_seconds": record["fit"].get("seconds"),
        "fit": record["fit"],
        "peak_rss_mib": None,
        "images_per_s": summary["written"] / summary["seconds"] if summary.get("seconds") else None,
        "psnr": summary["mean_psnr_db"],
        "ssim": summary["mean_ssim"],
        "reused": True,
    }


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "p0")
    parser.add_argument("--methods", default="random,em-classwise,em-samplewise")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--mix", default="0", help="comma-separated clean fractions, e.g. 0,0.5,0.8")
    parser.add_argument("--reuse", action="store_true", help="reuse a method's protected folder when it exists")
    parser.add_argument("--resnet", action="store_true", help="add the ResNet-18 transfer check (500/class, 8 epochs, 1 seed)")
    parser.add_argument("--table", default="p0", help="name of the stored table (benchmarks/results/tables/NAME.json)")
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    subset, test = p0_data(args.shared, args.work)
    clean = load_image_folder(subset, classes=test.classes)

    mixes = [float(m) for m in args.mix.split(",")]
    results_path = args.work / "results.json"
    earlier = json.loads(results_path.read_text()) if results_path.exists() else {}
    rows: dict[str, dict] = {"clean": {"train": clean}}
    for method in [m for m in args.methods.split(",") if m]:
        out = args.work / method
        if args.reuse and (out / "protection.json").exists():
            print(f"reusing {out}", file=sys.stderr, flush=True)
            gen = recorded_generation(out, (earlier.get(method) or {}).get("generation"))
        else:
            print(f"generating {method} ...", file=sys.stderr, flush=True)
            gen = generate(method, subset, out, seed=0)
        clean_pairs, protected = load_pairs(out, subset)
        for mix in mixes:
            train = mix_with_clean(protected, clean_pairs, mix, seed=0) if mix else protected
            rows[method if mix == 0 else f"{method} + {mix:.0%} clean"] = {
                "gen": gen, "train": train, "mix": mix, "folder": out,
            }

    results = {}
    for name, row in rows.items():
        finals, peaks, times = [], [], []
        for seed in range(args.seeds):
            model = build_classifier("small-cnn", len(test.classes), seed=seed)
            result = train_classifier(model, row["train"], test, TrainConfig(epochs=args.epochs), seed=seed)
            finals.append(result.final)
            peaks.append(result.peak)
            times.append(result.seconds)
            print(f"{name} seed {seed}: final {result.final:.4f} peak {result.peak:.4f} ({result.seconds:.0f} s)", file=sys.stderr, flush=True)
        entry = {"final": finals, "peak": peaks, "train_seconds": times, "generation": row.get("gen"), "mix": row.get("mix", 0)}
        if args.resnet and not row.get("mix"):
            half = load_image_folder(row.get("folder", subset), per_class=500, classes=test.classes)
            result = train_classifier(build_classifier("resnet18", len(test.classes)), half, test, TrainConfig(epochs=8, lr=0.1))
            entry["resnet18"] = {"final": result.final, "peak": result.peak, "seconds": result.seconds}
        results[name] = entry

    results_path.write_text(json.dumps({**earlier, **results}, indent=2, default=str))
    columns = ["data", "small CNN test acc % (final)", "peak %", "generation s", "images/s", "peak RSS MiB", "PSNR dB", "SSIM"]
    if args.resnet:
        columns.append("ResNet-18 %")
    table_rows = []
    for name, entry in results.items():
        gen = entry["generation"] or {}
        cells = [
            name,
            mean_std(entry["final"]),
            mean_std(entry["peak"]),
            f"{gen['seconds']:.0f}" if gen.get("seconds") else None,
            f"{gen['images_per_s']:.0f}" if gen.get("images_per_s") else None,
            f"{gen['peak_rss_mib']:.0f}" if gen.get("peak_rss_mib") else None,
            f"{gen['psnr']:.2f}" if gen else None,
            f"{gen['ssim']:.4f}" if gen else None,
        ]
        if args.resnet:
            cells.append(f"{100 * entry['resnet18']['final']:.2f}" if "resnet18" in entry else None)
        table_rows.append(cells)
    print(f"\nProtocol P0, {args.seeds} seed(s), {args.epochs} epochs, {torch.get_num_threads()} threads\n")
    print_markdown_table(columns, table_rows)
    reused = [name for name, entry in results.items() if (entry["generation"] or {}).get("reused")]
    write_table(
        args.table,
        title="Methods against a plain victim" + (" mixed with clean data" if any(mixes) else ""),
        section="P0: protection against a plain victim",
        command=command_line(),
        protocol="P0",
        columns=columns,
        rows=table_rows,
        notes=(f"Clean-test accuracy % of the small-CNN victim trained on each folder ({args.epochs} epochs, "
               f"{args.seeds} seeds, mean ± std; peak: best epoch). \"+ N% clean\": that fraction of the protected "
               "images replaced by their clean originals. Generation: wall time of `protect run` over the "
               "10,000 train images, reading and writing the files included; peak RSS of that process; mean "
               "PSNR and SSIM of the written images against the originals."
               + (f" Generation figures of {', '.join(reused)} are those recorded when the folder was made (--reuse)."
                  if reused else "")),
    )

if __name__ == "__main__":
    main()

"""The settings chosen from the folder (protect.autoset), measured on small real-photo folders:
Imagenette subsets of a few dozen to a few hundred photos, protected with the defaults and with
other settings, each against a victim trained on it (protocol P2 data and victims, smaller sets).

Each folder is ``CLASSES x PER_CLASS`` photos of the Imagenette train split (the first files by
name); victims test on the val photos of the same classes. A variant is a method plus the
``--set`` values it is run with ("defaults": none, so the rules choose). Clean and random-noise
control runs are shared by the variants of a folder. Every finished run is kept in
``--work/runs.json``, so a rerun only trains what is missing.

    python benchmarks/p2_auto.py                       # the folders and variants below
    python benchmarks/p2_auto.py --folders 40 --victims small-cnn@64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from attacks.train import train_classifier
from attacks.verify import VerifyData, load_verify_data, victim_train_config
from protect.models import build_classifier
from protect.runner import protect_folder
from tables import write_table  # benchmarks/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"
#: two classes that differ in content, for the folders of two classes
PAIR = ("church", "tench")

#: name -> (photos per class, classes: "pair" or "all")
FOLDERS = {"40": (20, "pair"), "250": (25, "all"), "500": (50, "all")}
#: name -> (method, --set values)
VARIANTS = {
    "em-classwise defaults": ("em-classwise", {}),
    "em-classwise paper batch/step": ("em-classwise", {"batch_size": 512, "step_size": "0.8/255"}),
    "em-classwise 32 px": ("em-classwise", {"resolution": 32}),
    "em-samplewise defaults": ("em-samplewise", {}),
    "em-samplewise 32 px": ("em-samplewise", {"resolution": 32}),
}


def link_subset(split: Path, dest: Path, per_class: int, classes: list[str]) -> Path:
    """A folder of symlinks to the first ``per_class`` files (by name) of each of ``classes``."""
    for name in classes:
        (dest / name).mkdir(parents=True, exist_ok=True)
        for path in sorted((split / name).iterdir())[:per_class]:
            link = dest / name / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    return dest


def folder_classes(kind: str) -> list[str]:
    return sorted(PAIR) if kind == "pair" else sorted(p.name for p in (IMAGENETTE / "train").iterdir() if p.is_dir())


def train_victim(data: VerifyData, kind: str, victim: str, epochs: int, seed: int) -> dict:
    train = data.training_set(kind)
    size = train.images.shape[-1]
    model = build_classifier(victim, len(train.classes), seed=seed, image_size=size)
    config = victim_train_config(victim, epochs, len(train), size)
    result = train_classifier(model, train, data.test, config, seed=seed)
    return {"final": result.final, "peak": result.peak, "seconds": round(result.seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "p2-auto")
    parser.add_argument("--folders", default=",".join(FOLDERS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma list of the names in VARIANTS")
    parser.add_argument("--victims", default="small-cnn@64", help="comma list of VICTIM@SIZE")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="store the table (benchmarks/results/tables/p2-auto.json)")
    args = parser.parse_args()
    if not IMAGENETTE.is_dir():
        sys.exit(f"{IMAGENETTE} not found: P2 needs the shared Imagenette folder")
    torch.set_num_threads(os.cpu_count() or 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs_path = args.work / "runs.json"
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}

    def save() -> None:
        args.work.mkdir(parents=True, exist_ok=True)
        runs_path.write_text(json.dumps(runs, indent=1))

    rows = []
    for folder in args.folders.split(","):
        per_class, kind = FOLDERS[folder]
        classes = folder_classes(kind)
        train_dir = link_subset(IMAGENETTE / "train", args.work / f"folder-{folder}" / "train", per_class, classes)
        test_dir = link_subset(IMAGENETTE / "val", args.work / f"folder-{folder}" / "val", 100, classes)
        for variant in args.variants.split(","):
            method, settings = VARIANTS[variant]
            out = args.work / f"folder-{folder}" / variant.replace(" ", "-").replace("/", "-")
            key = f"{folder}/{variant}"
            if key not in runs.get("generation", {}):
                print(f"[{time.strftime('%T')}] {key}: protecting", file=sys.stderr, flush=True)
                started = time.perf_counter()
                overrides = {k: v for k, v in settings.items()}
                summary = protect_folder(method, train_dir, out, overrides=overrides or None, overwrite=True)
                record = json.loads((out / "protection.json").read_text())
                runs.setdefault("generation", {})[key] = {
                    "seconds": round(time.perf_counter() - started, 1), "fit_seconds": round(summary.fit_seconds, 1),
                    "config": record["config"], "auto": {k: v["value"] for k, v in record["auto_settings"].items()},
                    "fit": record["fit"],
                }
                save()
            for victim_spec in args.victims.split(","):
                victim, size = victim_spec.split("@")
                data = load_verify_data(out, train_dir, test_dir, resolution=int(size))
                for data_kind in ("clean", "control", "protected"):
                    for seed in range(args.seeds):
                        run_key = f"{folder}/{victim_spec}/{args.epochs}/{seed}/" + (variant if data_kind == "protected" else data_kind)
                        if run_key not in runs.setdefault("victims", {}):
                            runs["victims"][run_key] = train_victim(data, data_kind, victim, args.epochs, seed)
                            print(f"[{time.strftime('%T')}] {run_key}: {runs['victims'][run_key]}", file=sys.stderr, flush=True)
                            save()
                gen = runs["generation"][key]

                def accuracy(name: str) -> str:
                    values = [runs["victims"][f"{folder}/{victim_spec}/{args.epochs}/{s}/{name}"]["final"] for s in range(args.seeds)]
                    return f"{100 * statistics.mean(values):.1f}" + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")

                chosen = ", ".join(f"{k}={round(v * 255, 2)}/255" if k == "step_size" else f"{k}={v}" for k, v in gen["auto"].items())
                fixed = ", ".join(f"{k}={v}" for k, v in settings.items())
                rows.append([
                    f"{len(classes) * per_class} ({len(classes)} classes)", variant, chosen or "–", fixed or "–",
                    gen["fit"].get("rounds_run"), gen["fit_seconds"], victim_spec.replace("@", " @ ") + " px",
                    accuracy("clean"), accuracy("control"), accuracy(variant),
                ])
    columns = ["photos", "variant", "chosen by the rules", "set by hand", "rounds", "fit s", "victim",
               "clean %", "control %", "protected %"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    if args.table:
        write_table(
            "p2-auto", title="Settings chosen from the folder, on small photo folders", command="python " + " ".join(["benchmarks/p2_auto.py", *sys.argv[1:]]),
            protocol="P2", columns=columns, rows=rows, section="P2: real photos",
            notes=f"Imagenette train photos (224 px), the first files by name of each class; victims test on the 100 val "
                  f"photos of each of those classes. Victims: {args.epochs} epochs, {args.seeds} seeds (mean ± std of the "
                  "final accuracy), random-resized-crop + flip at 64 px and more. 'chosen by the rules': the settings "
                  "protect chose for the folder; 'set by hand': --set values (which no rule changes).",
        )


if __name__ == "__main__":
    main()

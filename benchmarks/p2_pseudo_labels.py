"""Pseudo-labels of an unlabelled photo folder: how well the k-means clusters of each feature
extractor follow the true classes (protocol P2 data: the 3,000 Imagenette train photos, whose
labels are read here only to score the clusters).

For each extractor of protect.cluster.PSEUDO_LABEL_FEATURES and each working resolution, the
photos are read at that resolution, clustered into 10 pseudo-classes exactly as `protect run`
does for a flat folder, and scored by normalised mutual information (NMI, arithmetic mean
normalisation) and purity against the true labels; 0 NMI is chance, 1 the true classes.

    python benchmarks/p2_pseudo_labels.py --table
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from attacks.data import load_image_folder
from protect.cluster import PSEUDO_LABEL_FEATURES, cluster_quality, pseudo_labels
from tables import write_table  # benchmarks/ is the script's folder

ROOT = Path(__file__).resolve().parents[1]
IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", default="32,64")
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3, help="k-means / feature seeds")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if not IMAGENETTE.is_dir():
        sys.exit(f"{IMAGENETTE} not found: P2 needs the shared Imagenette folder")
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for resolution in (int(r) for r in args.resolutions.split(",")):
        data = load_image_folder(IMAGENETTE / "train", size=resolution, per_class=args.per_class)
        for extractor in PSEUDO_LABEL_FEATURES:
            scores, seconds = [], []
            for seed in range(args.seeds):
                started = time.perf_counter()
                assignments = pseudo_labels(data.images, len(data.classes), surrogate="small-cnn", device=torch.device("cpu"),
                                            seed=seed, extractor=extractor)
                seconds.append(time.perf_counter() - started)
                quality = cluster_quality(assignments, data.labels)
                scores.append((quality["nmi"], quality["purity"]))
            nmi = [s[0] for s in scores]
            purity = [s[1] for s in scores]
            row = [extractor, resolution, f"{min(nmi):.3f} – {max(nmi):.3f}", f"{sum(nmi) / len(nmi):.3f}",
                   f"{sum(purity) / len(purity):.3f}", f"{sum(seconds) / len(seconds):.1f}"]
            print("| " + " | ".join(str(c) for c in row) + " |", flush=True)
            rows.append(row)
    if args.table:
        write_table(
            "p2-pseudo-labels", title="Pseudo-labels of an unlabelled photo folder: clusters against the true classes",
            command="python " + " ".join(["benchmarks/p2_pseudo_labels.py", *sys.argv[1:]]), protocol="P2",
            columns=["features", "working resolution px", "NMI (range over seeds)", "NMI mean", "purity mean", "seconds"],
            rows=rows, section="P2: real photos",
            notes=f"The {len(data)} Imagenette train photos, clustered into 10 pseudo-classes by k-means on each extractor's "
                  f"features ({args.seeds} seeds); labels read only to score. random-cnn: penultimate features of a randomly "
                  "initialised small CNN (the earlier default); patch-kmeans: a single-layer network learned on the folder "
                  "(Coates, Lee & Ng 2011). Seconds: features and k-means, per seed.",
        )


if __name__ == "__main__":
    main()

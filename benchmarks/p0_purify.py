"""Protocol P0 diffusion purification: train the purifier, measure it, verify against it.

The attacker's purifier is a small DDPM trained on CIFAR-10 train images 1000-4999 of every
class (40,000 images, disjoint from the protected first 1,000 per class).

    python benchmarks/p0_purify.py train --steps 3000 --minutes 30   # resumable: repeat until finished
    python benchmarks/p0_purify.py measure                           # denoising error, PSNR, images/s
    python benchmarks/p0_purify.py verify                            # the P0 verify rows at t* = 0.1T, 0.2T
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from p0 import build_subset  # noqa: E402

T_STARS = (0.1, 0.2)
STEPS = 10


def train(args: argparse.Namespace) -> None:
    clean = build_subset(args.shared / "data" / "cifar10" / "train", args.work / "purifier-train", 4000, offset=1000)
    extra = ["--minutes", str(args.minutes)] if args.minutes else []
    subprocess.run([sys.executable, "-m", "protect.cli", "purifier", "train", str(clean), str(args.work / "purifier"),
                    "--steps", str(args.steps), *extra], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "p0")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train")
    p_train.add_argument("--steps", type=int, default=3000)
    p_train.add_argument("--minutes", type=float, default=None)
    args = parser.parse_args()
    if not (args.shared / "data" / "cifar10").is_dir():
        sys.exit(f"{args.shared / 'data' / 'cifar10'} not found: P0 needs the shared CIFAR-10 folder")
    {"train": train}[args.command](args)


if __name__ == "__main__":
    main()

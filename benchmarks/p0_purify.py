"""Protocol P0 diffusion purification: train the purifier, measure it, verify against it.

The attacker's purifier is a small DDPM trained on CIFAR-10 train images 1000-4999 of every
class (40,000 images, disjoint from the protected first 1,000 per class).

    python benchmarks/p0_purify.py train --steps 2400 --minutes 30   # resumable: repeat until finished
    python benchmarks/p0_purify.py measure        # noise-prediction error and PSNR at t*, images/s (stored table)
    python benchmarks/p0_purify.py verify         # P0 verify rows at t* = 0.1T and 0.2T, 5 reverse steps (stored table)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from p0 import build_subset  # noqa: E402
from tables import machine, write_table  # noqa: E402

T_STARS = (0.1, 0.2)


def purifier_dir(args: argparse.Namespace) -> Path:
    return args.work / "purifier"


def train(args: argparse.Namespace) -> None:
    clean = build_subset(args.shared / "data" / "cifar10" / "train", args.work / "purifier-train", 4000, offset=1000)
    extra = ["--minutes", str(args.minutes)] if args.minutes else []
    subprocess.run([sys.executable, "-m", "protect.cli", "purifier", "train", str(clean), str(purifier_dir(args)),
                    "--steps", str(args.steps), *extra], check=True)


def _training_note(record: dict) -> str:
    config = record["config"]
    return (f"Purifier: UNet2DModel, widths {config['channels']}, {config['layers_per_block']} ResNet block per level, "
            f"trained on timesteps 0-{record['trained_t_max']} of T = {config['num_train_timesteps']}, "
            f"{record['steps_done']} steps of batch {config['batch_size']} on {record['images']} clean CIFAR-10 images "
            f"(train 1000-4999 per class) in {record['seconds'] / 60:.0f} min ({record['precision']}); "
            f"training loss (noise MSE over its last interval) {record['losses'][-1]:.4f}.")


def measure(args: argparse.Namespace) -> None:
    import torch

    from attacks.data import load_image_folder
    from attacks.purify import denoising_error, load_purifier, purify
    from protect.metrics import psnr

    torch.set_num_threads(os.cpu_count() or 1)
    purifier = load_purifier(purifier_dir(args))
    record = json.loads((purifier_dir(args) / "purifier.json").read_text())
    test = build_subset(args.shared / "data" / "cifar10" / "test", args.work / "test-subset", 200)
    images = load_image_folder(test).images  # held-out clean images: neither purifier nor victims train on them
    rows = []
    sample = images[:1000]
    for t_star in T_STARS:
        error = denoising_error(purifier, images, t_star)
        for steps in (int(s) for s in args.steps.split(",")):
            purify(purifier, sample[:250], t_star=t_star, steps=steps)  # warm-up
            started = time.perf_counter()
            purified = purify(purifier, sample, t_star=t_star, steps=steps)
            seconds = time.perf_counter() - started
            quality = [psnr(a.numpy(), b.numpy()) for a, b in zip(sample, purified)]
            rows.append([f"{t_star:g}T ({round(t_star * purifier.num_train_timesteps)})", steps, round(error, 4),
                         round(sum(quality) / len(quality), 2), round(len(sample) / seconds, 1)])
            print(rows[-1], flush=True)
    params = sum(p.numel() for p in purifier.unet.parameters())
    write_table(
        "p0-purifier", title="P0: the diffusion purifier (small DDPM) at t*", section="P0 diffusion purification",
        command=f"python benchmarks/p0_purify.py measure --steps {args.steps}", protocol="P0", hardware=machine(),
        columns=["t*", "reverse steps", "noise-prediction MSE at t*", "PSNR purified vs clean (dB)", "purified images/s"],
        rows=rows,
        notes=_training_note(record) + f" {params / 1e6:.2f}M parameters. Measured on the 2,000 held-out P0 test images "
              "(MSE; 1.0 is predicting no noise) and the first 1,000 of them (PSNR, throughput, batch 250).",
    )


def verify(args: argparse.Namespace) -> None:
    """p0_verify.py with the diffusion-purify rows; it stores the table p0-verify-purify-small-cnn."""
    extra = ["--victims", "small-cnn", "--countermeasures", "diffusion-purify", "--purifier", str(purifier_dir(args)),
             "--purify-t", ",".join(f"{t:g}" for t in T_STARS), "--purify-steps", str(args.steps), *args.extra]
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "p0_verify.py"), "--preset", "standard", "--tag", "purify",
                    "--methods", args.methods, "--work", str(args.work), "--shared", str(args.shared), "--", *extra],
                   check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "p0")
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train")
    p_train.add_argument("--steps", type=int, default=3000)
    p_train.add_argument("--minutes", type=float, default=None)
    p_measure = sub.add_parser("measure")
    p_measure.add_argument("--steps", default="5,10", help="comma list of reverse (denoising) step counts")
    p_verify = sub.add_parser("verify")
    p_verify.add_argument("--steps", type=int, default=5, help="reverse (denoising) steps from t* to 0")
    p_verify.add_argument("--methods", default="em-classwise,em-samplewise")
    p_verify.add_argument("extra", nargs="*", help="further options for protect verify (after --)")
    args = parser.parse_args()
    if not (args.shared / "data" / "cifar10").is_dir():
        sys.exit(f"{args.shared / 'data' / 'cifar10'} not found: P0 needs the shared CIFAR-10 folder")
    {"train": train, "measure": measure, "verify": verify}[args.command](args)


if __name__ == "__main__":
    main()

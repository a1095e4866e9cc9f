"""Protocol P0 verification matrix (victims x countermeasures) through `protect verify`.

Protects the P0 train subset with each method (reusing benchmarks/results/p0/<method> when
p0.py already wrote it), runs `protect verify` with the chosen preset, and prints the
matrix with its wall time. The clean and control cells are trained once and shared by all
methods (benchmarks/results/p0/verify-baselines).

    python benchmarks/p0_verify.py --preset quick                 # ~15 min per method on 2 cores
    python benchmarks/p0_verify.py --preset standard              # P0 as written: hours on CPU
    python benchmarks/p0_verify.py --preset standard -- --report-only   # the matrix so far
    python benchmarks/p0_verify.py --preset standard --device cuda      # generation and victims on a GPU
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "p0")
    parser.add_argument("--methods", default="em-classwise,em-samplewise")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--device", default="cpu", help="for generation and victims: cpu, cuda, cuda:N or auto")
    parser.add_argument("extra", nargs="*", help="further options passed to protect verify (after --)")
    args = parser.parse_args()

    cifar = args.shared / "data" / "cifar10"
    if not cifar.is_dir():
        sys.exit(f"{cifar} not found: P0 needs the shared CIFAR-10 folder")
    subset = build_subset(cifar / "train", args.work / "train-subset", 1000)
    test = build_subset(cifar / "test", args.work / "test-subset", 200)
    cli = [sys.executable, "-m", "protect.cli"]
    for method in [m for m in args.methods.split(",") if m]:
        protected = args.work / method
        if not (protected / "protection.json").exists():
            subprocess.run([*cli, "run", method, str(subset), str(protected), "--overwrite", "--device", args.device], check=True)
        report = args.work / f"verify-{args.preset}-{method}"
        started = time.perf_counter()
        subprocess.run([*cli, "verify", str(protected), "--clean-train", str(subset), "--test", str(test),
                        "--preset", args.preset, "--out", str(report), "--device", args.device,
                        "--baselines", str(args.work / "verify-baselines"), *args.extra], check=True)
        seconds = time.perf_counter() - started
        document = json.loads((report / "report.json").read_text())
        runs = document["runs"]
        print(f"\n### {method}: protocol P0, preset {args.preset}: {runs['finished']} of {runs['planned']} training "
              f"runs, {runs['seconds']:.0f} s in all (including runs reused from earlier invocations or shared "
              f"baselines); this invocation {seconds:.0f} s, peak RSS {document['peak_memory_mib']['rss']:.0f} MiB\n")
        print("| victim | countermeasure | clean % | control % | protected % | protected peak % | verdict |")
        print("|---|---|---|---|---|---|---|")
        for row in document["rows"]:
            def cell(kind: str, key: str = "final") -> str:
                if kind not in row:
                    return "–"
                stats = row[kind][key]
                return f"{100 * stats['mean']:.1f}" + (f" ± {100 * stats['std']:.1f}" if stats["n"] > 1 else "")
            print(f"| {row['victim']} | {row['countermeasure']} | {cell('clean')} | {cell('control')} | "
                  f"{cell('protected')} | {cell('protected', 'peak')} | {row['verdict']['text']} |")
        for warning in document["warnings"]:
            print(f"- warning: {warning}")


if __name__ == "__main__":
    main()

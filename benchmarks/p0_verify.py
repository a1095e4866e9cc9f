"""Protocol P0 verification matrix (victims x countermeasures) through `protect verify`.

Protects the P0 train subset with each method (reusing benchmarks/results/p0/<method> when
p0.py already wrote it), runs `protect verify` with the chosen preset, and prints the
matrix with its wall time. The clean and control cells are trained once and shared by all
methods (benchmarks/results/p0/verify-baselines). Every finished training run is kept in
benchmarks/results/p0/verify-<preset>-<method>/cells/; from those files the script stores one
table per victim (benchmarks/tables.py), all methods side by side, for docs/results.md.

    python benchmarks/p0_verify.py --preset quick                 # ~15 min per method on 2 cores
    python benchmarks/p0_verify.py --preset standard              # P0 as written: hours on CPU
    python benchmarks/p0_verify.py --preset standard -- --report-only   # the matrix so far, in seconds
    python benchmarks/p0_verify.py --preset standard --device cuda      # generation and victims on a GPU

With --report-only, a method whose protected folder is absent (it is not kept in the
repository) gets no card, but its table is still built from the stored runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from p0 import build_subset  # noqa: E402
from tables import command_line, print_markdown_table, write_table  # noqa: E402

from attacks.countermeasures import row_name  # noqa: E402
from attacks.purify import plan_variants  # noqa: E402
from attacks.report import summarise  # noqa: E402
from attacks.verify import Plan, make_plan  # noqa: E402

# P0's test set holds 200 images of each of the 10 classes: always answering one class scores 10%.
P0_CHANCE = 0.1
VICTIM_TITLES = {"small-cnn": "small CNN", "resnet18": "ResNet-18", "vgg11": "VGG-11", "vit-small": "small ViT"}


def verify_options(extra: list[str]) -> argparse.Namespace:
    """The options among ``extra`` (passed on to protect verify) that change which runs a table holds."""
    parser = argparse.ArgumentParser(add_help=False)
    for name in ("--victims", "--countermeasures", "--relabel"):
        parser.add_argument(name)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--mix", type=float, default=0.5)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--purifier")
    parser.add_argument("--purify-t", default="0.1,0.2")
    parser.add_argument("--purify-steps", type=int, default=10)
    return parser.parse_known_args(extra)[0]


def verify_plan(preset: str, options: argparse.Namespace) -> Plan:
    split = lambda value: value.split(",") if value else None  # noqa: E731
    countermeasures = split(options.countermeasures)
    variants = {}
    if "diffusion-purify" in (countermeasures or []):
        t_stars = [float(t) for t in options.purify_t.split(",")]
        variants["diffusion-purify"] = plan_variants(options.purifier, t_stars, options.purify_steps)
    return make_plan(preset, victims=split(options.victims), countermeasures=countermeasures, epochs=options.epochs,
                     seeds=options.seeds, clean_fraction=options.mix, relabel=options.relabel, variants=variants)


def stored_runs(report: Path, plan: Plan) -> list[dict[str, Any]]:
    """The finished runs of ``plan`` kept in ``report/cells`` (protect verify writes every run
    it reports there, the shared clean and control runs included)."""
    paths = [report / "cells" / f"{cell.key()}.json" for cell in plan.cells()]
    return [json.loads(path.read_text(encoding="utf-8")) for path in paths if path.exists()]


def percent(stats: dict[str, Any] | None, key: str = "final") -> str | None:
    if not stats:
        return None
    value = stats[key]
    return f"{100 * value['mean']:.1f}" + (f" ± {100 * value['std']:.1f}" if value["n"] > 1 else "")


def countermeasure_label(row: dict[str, Any]) -> str:
    names = {"jpeg": "jpeg (q10)", "bit-depth": "bit-depth (2 bits)"}
    if row["countermeasure"] == "mix":
        return f"mix {row['settings']['clean_fraction']:.0%} clean"
    return names.get(row["countermeasure"], row["countermeasure"])


def hardware_of(runs: list[dict[str, Any]]) -> str:
    """Where the runs trained, e.g. "AMD EPYC CPU, 2 threads: 30 runs fp32, 14 bf16"."""
    counts = Counter((run.get("device") or "device not recorded", run.get("precision") or "?") for run in runs)
    devices = sorted({device for device, _ in counts})
    return "; ".join(f"{device}: " + ", ".join(f"{n} runs {precision}" for (d, precision), n in sorted(counts.items()) if d == device)
                     for device in devices)


def store_tables(args: argparse.Namespace, methods: list[str], options: argparse.Namespace) -> None:
    """One table per victim from the runs stored for each method, methods side by side."""
    if options.relabel:
        print("no table stored: with --relabel the chance level is not P0's", file=sys.stderr)
        return
    plan = verify_plan(args.preset, options)
    name = args.tag or args.preset
    stored = {m: stored_runs(args.work / f"verify-{name}-{m}", plan) for m in methods}
    rows = {m: summarise(stored[m], P0_CHANCE) for m in methods}
    for victim in plan.victims:
        by_method = {m: {r["countermeasure"]: r for r in rows[m] if r["victim"] == victim} for m in methods}
        if not any(by_method.values()):
            print(f"no stored runs for {victim}: its table is left as it was", file=sys.stderr)
            continue
        # the clean and control runs are shared: count them once
        runs = [run for i, m in enumerate(methods) for run in stored[m]
                if run["cell"]["victim"] == victim and (i == 0 or run["cell"]["data"] == "protected")]
        table_rows = []
        for countermeasure in dict.fromkeys(row_name(n, settings) for n, settings in plan.countermeasures):
            present = [by_method[m][countermeasure] for m in methods if countermeasure in by_method[m]]
            if not present:
                continue
            first = present[0]
            cells: list[Any] = [countermeasure_label(first), percent(first.get("clean")), percent(first.get("control"))]
            for m in methods:
                row = by_method[m].get(countermeasure, {})
                protected = row.get("protected")
                cells += [percent(protected), percent(protected, "peak"), row["verdict"]["text"] if protected else None]
            table_rows.append(cells)
        columns = ["countermeasure", "clean", "control"]
        for m in methods:
            columns += [m, f"{m} peak", f"{m} verdict"]
        epochs, seeds, per_class = plan.epochs[victim], plan.seeds[victim], plan.per_class.get(victim)
        training = f"{per_class} images per class, " if per_class else ""
        hours = sum(run.get("wall_seconds", run["seconds"]) for run in runs) / 3600
        print(f"\n{victim}, {name}: final clean-test accuracy %\n")
        print_markdown_table(columns, table_rows)
        write_table(
            f"p0-verify-{name}-{victim}",
            title=f"Verification, `{args.preset}` preset{f' ({args.tag})' if args.tag else ''}: "
                  f"{VICTIM_TITLES.get(victim, victim)} victim",
            section="P0: verification against countermeasures",
            command=command_line(),
            protocol="P0",
            hardware=hardware_of(runs),
            columns=columns,
            rows=table_rows,
            notes=(f"Final clean-test accuracy % of a {VICTIM_TITLES.get(victim, victim)} victim ({training}{epochs} epochs, "
                   f"{seeds} seed(s); "
                   "mean ± std over seeds) trained on the clean originals, on a random-noise control of the same "
                   "budget and on each method's protected copy, with the countermeasure applied to its training; "
                   "peak: the protected victim's best epoch. The clean and control runs are shared by all methods; "
                   "where a countermeasure has no clean run of its own (mixing) the row compares with the plain "
                   "clean run. Verdict as on the protection card: protected when the final accuracy is within 10 "
                   f"points of chance (10%) or below half the clean run's. Built from the {len(runs)} training runs "
                   f"stored in benchmarks/results/p0/verify-{name}-*/cells ({hours:.1f} h of training in all); "
                   "each file records its hardware and precision. The noise was made with each method's default "
                   "(small-CNN) surrogate." + noise_generations(stored, victim) + purification_note(options)),
        )


def purification_note(options: argparse.Namespace) -> str:
    """What a diffusion-purify row means and which purifier made it."""
    if "diffusion-purify" not in (options.countermeasures or ""):
        return ""
    record_file = Path(options.purifier) / "purifier.json"
    record = json.loads(record_file.read_text()) if record_file.exists() else {}
    trained = (f" The purifier ({options.purifier}) is a small DDPM trained {record['steps_done']} steps of batch "
               f"{record['config']['batch_size']} on {record['images']} clean images ({record['seconds'] / 60:.0f} min)."
               if record else "")
    return (" In a diffusion-purify row every training set (clean, control, protected) is purified before training "
            f"(noise to t*, then {options.purify_steps} reverse DDPM steps), so its clean column is what purification "
            "costs by itself." + trained)


def noise_generations(stored: dict[str, list[dict[str, Any]]], victim: str) -> str:
    """A sentence naming the methods whose protected runs trained on more than one generation of
    their noise, told apart by the data fingerprint each run records (older runs record none)."""
    counts = {}
    for method, runs in stored.items():
        fingerprints = {run.get("data_fingerprint") for run in runs
                        if run["cell"]["victim"] == victim and run["cell"]["data"] == "protected"}
        if len(fingerprints) > 1:
            counts[method] = len(fingerprints)
    if not counts:
        return ""
    named = ", ".join(f"{method} ({n})" for method, n in counts.items())
    return (f" The protected runs of {named} record more than one data fingerprint (runs from before fingerprints "
            "were recorded count as one): they may come from more than one generation of the noise.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "p0")
    parser.add_argument("--methods", default="em-classwise,em-samplewise")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--device", default="cpu", help="for generation and victims: cpu, cuda, cuda:N or auto")
    parser.add_argument("--tag", default=None, help="report folders are verify-TAG-METHOD (default: the preset)")
    parser.add_argument("extra", nargs="*", help="further options passed to protect verify (after --)")
    args = parser.parse_args()
    options = verify_options(args.extra)
    methods = [m for m in args.methods.split(",") if m]

    cifar = args.shared / "data" / "cifar10"
    for method in methods:
        protected = args.work / method
        report = args.work / f"verify-{args.tag or args.preset}-{method}"
        if options.report_only and not (protected / "protection.json").exists():
            print(f"{protected} not found: no card for {method}; its table comes from the runs stored in {report}/cells",
                  file=sys.stderr)
            continue
        if not cifar.is_dir():
            sys.exit(f"{cifar} not found: P0 needs the shared CIFAR-10 folder")
        subset = build_subset(cifar / "train", args.work / "train-subset", 1000)
        test = build_subset(cifar / "test", args.work / "test-subset", 200)
        cli = [sys.executable, "-m", "protect.cli"]
        if not (protected / "protection.json").exists():
            subprocess.run([*cli, "run", method, str(subset), str(protected), "--overwrite", "--allow-outside", "--device",
                            args.device], check=True)
        started = time.perf_counter()
        subprocess.run([*cli, "verify", str(protected), "--clean-train", str(subset), "--test", str(test),
                        "--preset", args.preset, "--out", str(report), "--device", args.device,
                        "--baselines", str(args.work / "verify-baselines"), *args.extra], check=True)
        print_card_summary(method, args.preset, report, time.perf_counter() - started)
    store_tables(args, methods, options)


def print_card_summary(method: str, preset: str, report: Path, seconds: float) -> None:
    document = json.loads((report / "report.json").read_text())
    runs = document["runs"]
    print(f"\n### {method}: protocol P0, preset {preset}: {runs['finished']} of {runs['planned']} training "
          f"runs, {runs['seconds']:.0f} s in all (including runs reused from earlier invocations or shared "
          f"baselines); this invocation {seconds:.0f} s, peak RSS {document['peak_memory_mib']['rss']:.0f} MiB\n")
    print("| victim | countermeasure | clean % | control % | protected % | protected peak % | verdict |")
    print("|---|---|---|---|---|---|---|")
    for row in document["rows"]:
        cells = [percent(row.get(kind)) or "–" for kind in ("clean", "control", "protected")]
        peak = percent(row.get("protected"), "peak") or "–"
        print(f"| {row['victim']} | {row['countermeasure']} | {' | '.join(cells)} | {peak} | {row['verdict']['text']} |")
    for warning in document["warnings"]:
        print(f"- warning: {warning}")


if __name__ == "__main__":
    main()

"""Robust error-minimising noise on P0: variants of em-robust / em-robust-classwise (set by
--set, as `protect run` takes them), each fitted once on the 10,000 P0 images and judged by
small-CNN victims (15 epochs) trained with the countermeasures the variant is meant to survive.

A variant is NAME=METHOD[:KEY=VALUE,KEY=VALUE...]. Each finished fit and victim run is kept in
``WORK/robust-variants.json`` and skipped when rerun, so variants can be added one at a time;
the table holds every stored variant.

    python benchmarks/p0_robust.py "defaults=em-robust"
    python benchmarks/p0_robust.py "more training=em-robust:train_steps=40,steps=3,step_size=4/255,max_rounds=10"
    python benchmarks/p0_robust.py "class-wise, EOT only=em-robust-classwise:rho_a=0,atk_steps=0,max_rounds=30" \\
        --countermeasures none,jpeg,grayscale
    python benchmarks/p0_robust.py --table-only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from p0 import p0_data  # noqa: E402
from p0_em_fast import protected_images, victim_accuracies  # noqa: E402
from speed import run_child  # noqa: E402
from tables import command_line, print_markdown_table, write_table  # noqa: E402

#: the table's columns: the countermeasures a robust variant is judged under
COUNTERMEASURES = ["none", "jpeg", "grayscale", "adv-training-4"]


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    name, equals, spec = text.partition("=")
    method, _, settings = spec.partition(":")
    if not equals or not method:
        sys.exit(f"variant {text!r}: expected NAME=METHOD[:KEY=VALUE,...]")
    return name, method, [s for s in settings.split(",") if s]


def measure(store: dict, variant: str, subset: Path, test, countermeasures: list[str], save) -> None:
    name, method, sets = parse_variant(variant)
    record = store.setdefault(name, {"method": method, "set": sets, "victims": {}})
    if record["method"] != method or record["set"] != sets:
        sys.exit(f"variant {name!r} is stored with other settings ({record['method']} {record['set']}): rename it")
    if "fit" in record and all(c in record["victims"] for c in countermeasures):
        return
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.safetensors"
        fit = run_child("fit", method, sets, subset, 10_000, state)
        if "error" in fit:
            sys.exit(f"{name}: {fit['error']}")
        record["fit"] = fit
        save()
        print(f"{name}: fit {fit['seconds']:.0f} s, {fit['fit']}", file=sys.stderr, flush=True)
        train = protected_images(sets, subset, 1000, state, method=method)
    for countermeasure in countermeasures:
        if countermeasure not in record["victims"]:
            record["victims"][countermeasure] = victim_accuracies(train, test, 1, countermeasure=countermeasure)
            save()
            print(f"{name} / {countermeasure}: {record['victims'][countermeasure]}", file=sys.stderr, flush=True)


def store_table(store: dict, countermeasures: list[str]) -> None:
    columns = ["variant", "method", "options", "fit s", "rounds", "final robust error",
               *[f"victim % ({c})" for c in countermeasures]]
    rows = []
    for name, record in store.items():
        fit = record.get("fit", {})
        summary = fit.get("fit", {})
        victims = [record["victims"].get(c) for c in countermeasures]
        rows.append([name, record["method"], ", ".join(record["set"]) or "defaults", round(fit["seconds"]) if fit else None,
                     summary.get("rounds_run"), summary.get("final_error"),
                     *[None if v is None else round(v[0], 1) for v in victims]])
    print_markdown_table(columns, rows)
    provenance = "".join(f" {name}: {record['note']}." for name, record in store.items() if record.get("note"))
    write_table("p0-em-robust-variants", title="Robust error-minimising noise: variants (P0)", command=command_line(),
                protocol="P0", columns=columns, rows=rows,
                notes="Each variant fitted once (seed 0) on the 10,000 P0 train images in a fresh process (fit only, "
                      "no file I/O); final robust error: the surrogate's error after transformation and attack when "
                      "the fit stopped (the stop rule's target is stop_error). Victims: small CNN, 15 epochs, seed 0, "
                      "trained on the protected images with the countermeasure named in the column, final accuracy "
                      "on the 2,000 clean P0 test images (clean training: 74.8%, JPEG 68.8%, grayscale 73.5%, "
                      "adversarial training at 4/255 64.0%; table p0-verify-robust-small-cnn)." + provenance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help="NAME=METHOD[:KEY=VALUE,...]")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "p0")
    parser.add_argument("--countermeasures", default=",".join(COUNTERMEASURES), help="a subset of the default")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    countermeasures = args.countermeasures.split(",")
    results = args.work / "robust-variants.json"
    store = json.loads(results.read_text()) if results.exists() else {}

    def save() -> None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(store, indent=1) + "\n")

    if not args.table_only:
        subset, test = p0_data(args.shared, args.work)
        for variant in args.variants:
            measure(store, variant, subset, test, countermeasures, save)
    store_table(store, COUNTERMEASURES)


if __name__ == "__main__":
    main()

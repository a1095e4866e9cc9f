"""Speed of every registered method: images/s and peak memory of fit and of apply, at several
dataset sizes (N = 2,500 / 5,000 / 10,000 of the P0 train subset: the first N/10 images of each
class), so the table shows how the cost grows with N.

Fit and apply run in separate child processes (the fitted state passes between them as a
safetensors file), so each peak RSS is that step's own. Times are of the library calls on
tensors already in memory: reading and writing files is not included (`benchmarks/p0.py` times
whole `protect run` invocations). Methods that cannot run with the options given (e.g. one that
needs pretrained weights or a trained generator) are listed with the reason.

    python benchmarks/speed.py                                   # every method, 3 sizes
    python benchmarks/speed.py --methods em-samplewise,random --sizes 2500
    python benchmarks/speed.py --set clusters:surrogate=small-cnn --set clusters:surrogate_weights=W.safetensors
    python benchmarks/speed.py --set em-samplewise:fast=false   # the paper's loop

The stored table keeps the rows of methods not measured in this call, so methods with very
different costs can be measured one call at a time into one table; each row names the options it
ran with.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _load(method: str, overrides: dict, subset: Path, n: int):
    """The first ``n // 10`` images of every class at the method's working resolution, with the
    generator and the batches it is fitted on and applied to."""
    from attacks.data import load_image_folder
    from protect.generator import method_class, resolve_config

    config = resolve_config(method, overrides=overrides)
    data = load_image_folder(subset, size=config.resolution, per_class=n // 10)
    labels = data.labels if method_class(method).needs_labels else None
    return config, data, labels


def child_fit(method: str, overrides: dict, subset: Path, n: int, state_file: Path) -> dict:
    from safetensors.torch import save_file

    from protect.generator import create_generator

    config, data, labels = _load(method, overrides, subset, n)
    generator = create_generator(method, config, seed=0)
    before = _peak_rss_mib()
    started = time.perf_counter()
    generator.fit(data.images, labels)
    seconds = time.perf_counter() - started
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(state_file))
    phases = {name: round(t, 1) for name, t in getattr(generator, "phase_seconds", {}).items()}
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "rss_before_mib": before, "fit": generator.fit_summary(),
            "phases": phases}


def child_apply(method: str, overrides: dict, subset: Path, n: int, state_file: Path) -> dict:
    from safetensors.torch import load_file

    from protect.budget import perturb_uint8
    from protect.generator import Batch, bounded_perturbation, create_generator

    config, data, labels = _load(method, overrides, subset, n)
    generator = create_generator(method, config, seed=0)
    generator.load_state_dict(load_file(str(state_file)))
    before = _peak_rss_mib()
    started = time.perf_counter()
    with torch.no_grad():
        for index in torch.arange(len(data)).split(config.batch_size):
            batch = Batch(
                images=data.images[index].float().div(255), labels=None if labels is None else labels[index],
                indices=index, paths=[data.paths[i] for i in index.tolist()],
                class_names=[data.classes[i] for i in data.labels[index].tolist()],
            )
            perturb_uint8(data.images[index], bounded_perturbation(generator, batch), config.eps)
    return {"seconds": time.perf_counter() - started, "peak_rss_mib": _peak_rss_mib(), "rss_before_mib": before}


def run_child(step: str, method: str, sets: list[str], subset: Path, n: int, state_file: Path) -> dict:
    """One step in a fresh process; its JSON answer, or the error it stopped with."""
    cmd = [sys.executable, __file__, "--child", step, method, str(n), str(subset), str(state_file), *sets]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        reason = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        reason = reason.split("Error: ", 1)[-1]  # the message, without the exception's module path
        return {"error": reason}
    return json.loads(lines[-1])


def main() -> None:
    from protect.config import parse_overrides
    from protect.generator import available_methods

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "p0")
    parser.add_argument("--methods", default="", help="comma-separated (default: every registered method)")
    parser.add_argument("--sizes", default="2500,5000,10000")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="an option for one method, as protect run --set takes it (repeatable)")
    parser.add_argument("--table", default="speed", help="name of the stored table (benchmarks/results/tables/NAME.json)")
    args = parser.parse_args()

    from p0 import build_subset

    cifar = args.shared / "data" / "cifar10"
    if not cifar.is_dir():
        sys.exit(f"{cifar} not found: the speed table uses the P0 train subset of the shared CIFAR-10 folder")
    subset = build_subset(cifar / "train", args.work / "train-subset", 1000)
    registered = available_methods()
    methods = [m for m in args.methods.split(",") if m] or list(registered)
    per_method: dict[str, list[str]] = {m: [] for m in methods}
    for item in args.set:
        method, colon, setting = item.partition(":")
        if not colon or "=" not in setting:
            sys.exit(f"--set {item!r}: expected METHOD:KEY=VALUE")
        if method not in per_method:
            sys.exit(f"--set {item!r}: {method} is not among the methods measured ({', '.join(methods)})")
        parse_overrides([setting])  # a typo fails here, not in every child
        per_method[method].append(setting)
    unknown = [m for m in methods if m not in registered]
    if unknown:
        sys.exit(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(registered)}")
    sizes = [int(s) for s in args.sizes.split(",")]

    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for n in sizes:
                state = Path(tmp) / f"{method}-{n}.safetensors"
                fit = run_child("fit", method, per_method[method], subset, n, state)
                apply = run_child("apply", method, per_method[method], subset, n, state) if "error" not in fit else fit
                if "error" in apply:
                    skipped.append([method, n, apply["error"]])
                    print(f"{method} N={n}: cannot run: {apply['error']}", file=sys.stderr, flush=True)
                    break  # a larger N fails the same way
                row = [method, n, round(n / fit["seconds"], 1), round(fit["seconds"], 1), round(fit["peak_rss_mib"]),
                       round(n / apply["seconds"], 1), round(apply["peak_rss_mib"]), fit["fit"].get("rounds_run"),
                       ", ".join(f"{name} {t}" for name, t in fit["phases"].items()) or None]
                rows.append(row)
                print(f"{method} N={n}: fit {fit['seconds']:.1f} s ({row[2]} img/s, peak {row[4]} MiB), "
                      f"apply {apply['seconds']:.2f} s ({row[5]} img/s, peak {row[6]} MiB)", file=sys.stderr, flush=True)

    columns = ["method", "N", "fit img/s", "fit s", "fit peak RSS MiB", "apply img/s", "apply peak RSS MiB", "rounds",
               "fit phases s", "options"]
    rows = [row + [options_text(per_method[row[0]])] for row in rows]
    rows += [[method, n, *[None] * 7, f"not measured: {reason}"] for method, n, reason in skipped]
    from tables import TABLES_DIR, print_markdown_table, write_table

    print_markdown_table(columns, rows)
    measured = {(method, options_text(per_method[method])) for method in methods}
    rows, commands = merged_with_stored(TABLES_DIR / f"{args.table}.json", columns, rows, measured, registered)
    commands.append("python benchmarks/speed.py " + " ".join(sys.argv[1:]))
    write_table(args.table, title="Speed of each method against N (P0 train subset)", section="Cost: speed and memory",
                command="; ".join(dict.fromkeys(commands)), protocol="P0", columns=columns, rows=rows,
                notes=(f"Fit and apply in separate processes on tensors in memory (no file I/O); peak RSS of each "
                       f"process, {torch.get_num_threads()} threads. rounds: the fit's outer rounds (its stop rule "
                       "decides how many). fit phases: seconds of an error-minimising fit spent training the "
                       "surrogate, optimising the noise and scoring the stop criterion in a separate pass. A row "
                       "whose options shorten the fit (fewer steps or epochs than the default) times that shorter "
                       "fit: its cost grows in proportion to them. A method that cannot run offline with the "
                       "options given is listed with the reason."))


def options_text(settings: list[str]) -> str:
    return ", ".join(settings) or "defaults"


def merged_with_stored(path: Path, columns: list[str], rows: list[list], measured: set[tuple[str, str]],
                       registered: list[str]) -> tuple[list[list], list[str]]:
    """``rows`` with the stored table's rows of the (method, options) not measured now, in
    registry order, and the commands that measured them."""
    if not path.exists():
        return rows, []
    stored = json.loads(path.read_text(encoding="utf-8"))
    if stored["columns"] != columns:
        return rows, []  # a table of another layout is replaced, not mixed with
    remeasured = {method for method, _ in measured}
    kept = [row for row in stored["rows"] if (row[0], row[-1]) not in measured
            and not (row[0] in remeasured and row[-1].startswith("not measured"))]
    order = {method: i for i, method in enumerate(registered)}
    merged = sorted(kept + rows, key=lambda row: (order.get(row[0], len(order)), row[-1], row[1]))
    commands = stored["command"].split("; ") if kept else []
    return merged, commands


def child_main(argv: list[str]) -> None:
    from protect.config import parse_overrides

    step, method, n, subset, state_file, *sets = argv
    torch.set_num_threads(os.cpu_count() or 1)
    handler = child_fit if step == "fit" else child_apply
    print(json.dumps(handler(method, parse_overrides(sets), Path(subset), int(n), Path(state_file))))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
    else:
        main()

"""Apply-phase throughput and peak memory of `protect batch`, for growing exports, on the
local and Ray engines.

The export is WebDataset-style tar shards (``--exports tar``) or a JSONL manifest naming image
files (``jsonl``) built from ../shared/data/cifar10/train (50,000 JPEGs, replicated to reach
larger N, classes interleaved so every shard holds all ten). An em-classwise
protector is fitted once on a small sample beforehand, so each timed run is the apply phase
alone: read, decode, perturb, check the budget, encode PNG, write the shards. Every (N, engine)
run is a fresh process; its peak memory is sampled over the whole process tree (driver, local
workers, Ray's processes) and for the driver alone, Linux /proc only. The table is printed and
stored for docs/results.md (benchmarks/results/tables/<--table>.json).

    python benchmarks/batch_throughput.py                          # N = 10k, 50k, 100k
    python benchmarks/batch_throughput.py --sizes 2000 --workers 2 # a quick check
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from tables import command_line, print_markdown_table, write_table  # noqa: E402

CIFAR_TRAIN = ROOT.parent / "shared" / "data" / "cifar10" / "train"
SHARD_SIZE = 5000
FIT_OVERRIDES = {"batch_size": 100, "step_size": "2/255", "max_rounds": 5}


def cifar_files() -> list[tuple[Path, int]]:
    """(path, class index) of every train image, classes interleaved."""
    classes = sorted(p for p in CIFAR_TRAIN.iterdir() if p.is_dir())
    per_class = [sorted(c.iterdir()) for c in classes]
    longest = max(len(files) for files in per_class)
    return [(files[i], label) for i in range(longest) for label, files in enumerate(per_class) if i < len(files)]


def build_export(folder: Path, n: int) -> Path:
    """Tar shards of ``n`` samples (``key.jpg`` + ``key.cls``), reused when already built."""
    done = folder / ".complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    files = cifar_files()
    for shard_start in range(0, n, SHARD_SIZE):
        with tarfile.open(folder / f"shard-{shard_start // SHARD_SIZE:05d}.tar", "w") as archive:
            for k in range(shard_start, min(n, shard_start + SHARD_SIZE)):
                path, label = files[k % len(files)]
                for name, data in ((f"{k:07d}.jpg", path.read_bytes()), (f"{k:07d}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    done.touch()
    return folder


def build_manifest(folder: Path, n: int) -> Path:
    """A JSONL manifest of ``n`` rows (image path, class index) naming links to the JPEGs."""
    manifest = folder / "data.jsonl"
    if (folder / ".complete").exists():
        return manifest
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "img").mkdir(parents=True)
    files = cifar_files()
    with open(manifest, "w", encoding="utf-8") as handle:
        for k in range(n):
            path, label = files[k % len(files)]
            (folder / "img" / f"{k:07d}.jpg").symlink_to(path.resolve())
            handle.write(json.dumps({"image": f"img/{k:07d}.jpg", "label": str(label)}) + "\n")
    (folder / ".complete").touch()
    return manifest


EXPORTS = {"tar": build_export, "jsonl": build_manifest}


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            return next((int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss_bytes(pid) for pid in tree)


def run_measured(command: list[str]) -> tuple[dict, int, int]:
    """Run ``command``, sampling its memory; returns its JSON result, the peak of its whole
    process tree and the peak of the driver process alone."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = driver_peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, driver_peak
        while not stop.is_set():
            peak = max(peak, tree_rss_bytes(process.pid))
            driver_peak = max(driver_peak, rss_bytes(process.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {process.returncode}")
    return json.loads(output.strip().splitlines()[-1]), peak, driver_peak


def one_run(args: argparse.Namespace) -> None:
    """The measured child: protect one export with the saved protector and print JSON."""
    from protect.runner import protect_export

    summary = protect_export(
        "em-classwise", args.source, args.dest, protector=args.protector, engine=args.engine,
        workers=args.workers, unit_size=args.unit_size, overwrite=True, allow_outside=True,  # rows link to the shared JPEGs
    )
    print(json.dumps({"written": summary.written, "failed": len(summary.failed), "apply_seconds": summary.apply_seconds}))


def fit_protector(work: Path) -> Path:
    from protect.runner import protect_export

    protector = work / "protector"
    if not (protector / "protector.json").exists():
        sample = build_export(work / "export-fit", 2000)
        protect_export("em-classwise", sample, work / "fit-out", overrides=FIT_OVERRIDES, fit_sample=1000,
                       save_protector_to=protector, overwrite=True)
        shutil.rmtree(work / "fit-out")
    return protector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--engines", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    parser.add_argument("--exports", nargs="+", default=["tar"], choices=sorted(EXPORTS))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--unit-size", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/protect-batch-bench"))
    parser.add_argument("--table", help="name of the stored table (default: batch-throughput-EXPORTS-ENGINES)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--protector", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one_run(args)
        return
    if not CIFAR_TRAIN.is_dir():
        sys.exit(f"{CIFAR_TRAIN} not found: the benchmark replicates the shared CIFAR-10 train images")
    args.work.mkdir(parents=True, exist_ok=True)
    protector = fit_protector(args.work)
    rows = []
    for export in args.exports:
        for n in args.sizes:
            source = EXPORTS[export](args.work / (f"export-{n}" if export == "tar" else f"export-{export}-{n}"), n)
            for engine in args.engines:
                dest = args.work / f"out-{export}-{n}-{engine}"
                command = [sys.executable, __file__, "--one", "--source", str(source), "--dest", str(dest),
                           "--protector", str(protector), "--engine", engine, "--workers", str(args.workers),
                           "--unit-size", str(args.unit_size)]
                result, peak, driver = run_measured(command)
                shutil.rmtree(dest)
                rate = result["written"] / result["apply_seconds"]
                rows.append((export, n, engine, result["written"], rate, peak / 2**20, driver / 2**20))
                print(f"done {export} N={n} {engine}", file=sys.stderr, flush=True)
    columns = ["export", "N", "engine", "written", "images/s", "peak RSS, all processes (MiB)", "peak RSS, driver (MiB)"]
    table_rows = [[export, f"{n:,}", engine, f"{written:,}", f"{rate:,.0f}", f"{peak:,.0f}", f"{driver:,.0f}"]
                  for export, n, engine, written, rate, peak, driver in rows]
    print(f"\napply phase, em-classwise with a saved protector, {args.workers} workers, units of {args.unit_size}\n")
    print_markdown_table(columns, table_rows)
    write_table(
        args.table or "batch-throughput-" + "-".join(args.exports + args.engines),
        title=f"`protect batch` apply phase: {', '.join(args.exports)} exports, {' and '.join(args.engines)} engine",
        section="protect batch: throughput and memory",
        command=command_line(),
        protocol="CIFAR-10 train images (50,000, replicated to reach N)",
        columns=columns,
        rows=table_rows,
        notes=(f"Apply phase of `protect batch em-classwise` with a saved protector (read, decode, perturb, check the "
               f"budget, encode PNG, write), {args.workers} workers, units of {args.unit_size} records; tar exports are "
               f"shards of {SHARD_SIZE:,} 32 x 32 JPEGs, jsonl a manifest naming one file per image. images/s includes "
               "each engine's start-up. Peak memory is sampled every 0.2 s over every process of the job (driver, "
               "workers, Ray's processes) and for the driver alone."),
    )

if __name__ == "__main__":
    main()

"""Stored result tables: what a benchmark measured, kept as JSON so the docs are generated from it.

Every benchmark that reports numbers calls :func:`write_table` with the rows it computed from
its own runs; ``python benchmarks/make_docs.py`` renders every stored table into
``docs/results.md``. A table names its command, protocol and hardware once, so the numbers in the
docs cannot drift from what was measured.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from protect.hardware import device_description
from protect.precision import resolved_precision

ROOT = Path(__file__).resolve().parents[1]
TABLES_DIR = ROOT / "benchmarks" / "results" / "tables"
NAME_PATTERN = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")


def machine(device: torch.device | str = "cpu", precision: str = "auto") -> str:
    """The hardware and precision a measurement ran with, e.g. "AMD EPYC CPU, 2 threads, bf16"."""
    device = torch.device(device)
    return f"{device_description(device)}, {resolved_precision(device, precision)}"


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def write_table(
    name: str,
    *,
    title: str,
    command: str,
    protocol: str,
    columns: list[str],
    rows: list[list[Any]],
    hardware: str | None = None,
    notes: str = "",
    section: str = "",
    measured: str | None = None,
    commit: str | None = None,
    directory: Path | None = None,
) -> Path:
    """Store one measured table as ``benchmarks/results/tables/NAME.json`` (replacing an older one).

    rows: one list per row, in column order; numbers are kept as given (round them where they are
    computed). section: the docs heading the table belongs under (default: the protocol).
    measured, commit: when and at which commit it was measured, for a table not measured just now
    from this checkout (default: today's date and the current commit). directory: where to store it
    (default: benchmarks/results/tables)."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"table name {name!r}: use lowercase letters, digits and '-' (it names the file and the docs anchor)")
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"table {name}: row {row!r} has {len(row)} cells for {len(columns)} columns")
    document = {
        "name": name,
        "title": title,
        "section": section or protocol,
        "command": command,
        "protocol": protocol,
        "hardware": hardware or machine(),
        "measured": measured or datetime.date.today().isoformat(),
        "commit": commit or _commit(),
        "columns": columns,
        "rows": rows,
        "notes": notes,
    }
    directory = directory or TABLES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def command_line() -> str:
    """How the running benchmark was invoked, e.g. "python benchmarks/p0.py --seeds 1", for ``command``."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script.name
    return " ".join(["python", str(shown), *sys.argv[1:]])


def print_markdown_table(columns: list[str], rows: list[list[Any]]) -> None:
    """Print a table as Markdown on stdout, as a benchmark shows what it stores."""
    print("\n".join(_markdown_rows(columns, rows)))


def read_tables(directory: Path = TABLES_DIR) -> list[dict[str, Any]]:
    """Every stored table, sorted by section, then name."""
    tables = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.json"))]
    return sorted(tables, key=lambda t: (t["section"], t["name"]))


def markdown(table: dict[str, Any]) -> str:
    """One stored table as Markdown: an anchor named like the table (so pages can link to
    ``results.md#NAME``), its title, the table, then where it came from."""
    lines = [f'<a id="{table["name"]}"></a>', "", f"### {table['title']}", "", *_markdown_rows(table["columns"], table["rows"])]
    lines += ["", f"Command: `{table['command']}`. Protocol: {table['protocol']}. Hardware: {table['hardware']}. "
              f"Measured {table['measured']}" + (f" (commit {table['commit']})" if table.get("commit") else "") + "."]
    if table.get("notes"):
        lines += ["", table["notes"]]
    return "\n".join(lines) + "\n"


def _cell_text(cell: Any) -> str:
    return "–" if cell is None else str(cell).replace("|", "\\|")


def _markdown_rows(columns: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell_text(cell) for cell in row) + " |" for row in rows]

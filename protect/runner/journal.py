"""The progress journal of a job: one JSON line per event, appended and synced to disk.

A killed job leaves at worst a torn last line, which is ignored; every unit it lists is
complete on disk, because a unit is journalled only after its part was renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class JournalState:
    """What the journal says was done: the job's settings, its fit, finished units, joined outputs."""

    header: dict[str, Any] | None = None
    fit: dict[str, Any] = field(default_factory=dict)
    units: dict[int, dict[str, Any]] = field(default_factory=dict)
    joined: set[str] = field(default_factory=set)
    complete: bool = False


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> JournalState:
        state = JournalState()
        if not self.path.exists():
            return state
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill; the event it held is redone
                kind = event.get("kind")
                if kind == "start":
                    state.header = event["settings"]
                elif kind == "fit":
                    state.fit = event["record"]
                elif kind == "unit":
                    state.units[event["unit"]] = event
                elif kind == "joined":
                    state.joined.add(event["output"])
                elif kind == "complete":
                    state.complete = True
        return state

    def append(self, event: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def start(self, settings: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("", encoding="utf-8")
        self.append({"kind": "start", "settings": settings})

    def fitted(self, record: dict[str, Any]) -> None:
        self.append({"kind": "fit", "record": record})

    def unit_done(self, result: dict[str, Any]) -> None:
        self.append({"kind": "unit", **result})

    def joined(self, output: str) -> None:
        self.append({"kind": "joined", "output": output})

    def completed(self) -> None:
        self.append({"kind": "complete"})

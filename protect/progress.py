"""How long-running library code reports progress without printing: a small reporter interface.

The CLI passes a reporter that draws progress bars; library callers get silence by default.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol


class Phase(Protocol):
    def advance(self, amount: int = 1) -> None: ...

    def describe(self, text: str) -> None: ...


class Reporter(Protocol):
    def phase(self, title: str, total: int | None) -> AbstractContextManager[Phase]:
        """A unit of work with ``total`` steps (None when unknown)."""
        ...

    def message(self, text: str, level: str = "info") -> None:
        """A line for the user; ``level`` is ``info``, ``warning`` or ``error``."""
        ...


class _NullPhase:
    def __enter__(self) -> "_NullPhase":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def advance(self, amount: int = 1) -> None:
        return None

    def describe(self, text: str) -> None:
        return None


class NullReporter:
    """Reports nothing; collects messages so that callers can inspect them."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str]] = []

    def phase(self, title: str, total: int | None) -> _NullPhase:
        return _NullPhase()

    def message(self, text: str, level: str = "info") -> None:
        self.messages.append((level, text))

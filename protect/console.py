"""What every command draws on the terminal: progress bars and messages on stderr, summaries
on stdout, usage errors with exit code 2, and the options every command parses the same way
(device, eps). Library code reports through :class:`protect.progress.Reporter`; this is the
terminal's side of it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from protect.budget import check_eps
from protect.config import parse_number

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

USAGE_ERROR = 2


class RichReporter:
    """Progress bars and messages on stderr, so stdout keeps only the summary."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    @contextmanager
    def phase(self, title: str, total: int | None) -> Iterator["_RichPhase"]:
        task = self.progress.add_task(title, total=total)
        phase = _RichPhase(self.progress, task)
        try:
            yield phase
        finally:
            # Finished phases collapse into one line, so long fits do not flood the terminal.
            info = next(t for t in self.progress.tasks if t.id == task)
            elapsed, description = info.elapsed or 0.0, info.description
            self.progress.remove_task(task)
            self.progress.console.print(f"[green]done[/green] {description} ({elapsed:.1f} s)", markup=True, highlight=False)

    def message(self, text: str, level: str = "info") -> None:
        style = {"error": "red", "warning": "yellow"}.get(level, "dim")
        prefix = {"error": "error: ", "warning": "warning: "}.get(level, "")
        self.progress.console.print(f"[{style}]{prefix}[/{style}]{escape(text)}", markup=True, highlight=False)


def progress_display() -> Progress:
    """The progress bars every command draws on stderr."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=err)


class _RichPhase:
    def __init__(self, progress: Progress, task: int) -> None:
        self.progress, self.task = progress, task

    def advance(self, amount: int = 1) -> None:
        self.progress.advance(self.task, amount)

    def describe(self, text: str) -> None:
        self.progress.update(self.task, description=text)
        if not self.progress.console.is_interactive:
            # No live bars in a log file or pipe: each round's or epoch's news becomes a line.
            elapsed = next(t for t in self.progress.tasks if t.id == self.task).elapsed or 0.0
            self.progress.console.print(f"{text} ({elapsed:.0f} s)", markup=False, highlight=False)


def fail(message: str) -> typer.Exit:
    err.print(f"[red]Error:[/red] {escape(message)}", markup=True, highlight=False)
    return typer.Exit(USAGE_ERROR)


def parse_eps(value: Optional[str]) -> float | None:
    if value is None:
        return None
    try:
        eps = parse_number(value)
    except (ValueError, ZeroDivisionError):
        raise fail(f"--eps must be a number such as 8/255 or 0.0314; got {value!r}") from None
    try:
        check_eps(eps)
    except ValueError as exc:
        raise fail(f"--eps {value}: {exc}") from None
    return eps


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise fail(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise fail("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device

"""Settings chosen from the folder: defaults that adapt to the images a method is fitted on.

A method lists the settings whose defaults depend on the folder in ``Generator.auto_settings``
(:class:`AutoSetting`: the key, its rule in words and the rule itself). The runner applies
them once it knows the folder (:class:`FolderFacts`: how many images the fit runs on, how many
classes their labels have, how large the images are), before the fit, for ``protect run`` and
``protect batch`` alike. A setting the user gave (their own YAML with ``--config``, ``--set``,
``--eps``) is never changed; a setting without a rule keeps its default. The values chosen are
reported and recorded in ``protection.json`` with their rules.

Rules whose input is the images' size alone (``from_size``: the working resolution) are
applied before the images are read at the working resolution; the others once the fit set and
its labels are known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from protect.config import read_yaml


@dataclass(frozen=True)
class FolderFacts:
    """What a rule may look at. images: images the fit runs on; classes: classes (or
    pseudo-classes) of the labels the fit uses, None without labels; side: the median shorter
    side of the images in pixels, None when unknown."""

    images: int = 0
    classes: int | None = None
    side: int | None = None

    def describe(self) -> str:
        parts = [f"{self.images} images"] if self.images else []
        if self.classes:
            parts.append(f"{self.classes} classes")
        if self.side:
            parts.append(f"median shorter side {self.side} px")
        return ", ".join(parts)


@dataclass(frozen=True)
class AutoSetting:
    """A config key whose default is chosen from the folder. ``rule``: the rule in words (it is
    recorded with the output and shown in ``protect methods --keys``); ``choose``: the rule, given
    the facts and the config as chosen so far (rules run in order, so a step size can follow the
    batch size chosen, or set, before it), returning None to keep the default; ``from_size``: it reads ``FolderFacts.side`` only (applied before images are read at the
    working resolution); ``levels``: the value is in pixel units and is shown as n/255."""

    key: str
    rule: str
    choose: Callable[[FolderFacts, dict[str, Any]], Any]
    from_size: bool = False
    levels: bool = False

    def shown(self, value: Any) -> str:
        return f"{value * 255:.3g}/255" if self.levels else str(value)


def user_keys(config_file: Path | None, overrides: dict[str, Any] | None, eps: float | None) -> frozenset[str]:
    """The config keys the user set: those of their own YAML, of ``--set`` and ``--eps``."""
    keys = set(read_yaml(config_file)) if config_file is not None else set()
    keys |= set(overrides or {})
    if eps is not None:
        keys.add("eps")
    return frozenset(keys)


def choose_settings(
    settings: Sequence[AutoSetting], config: dict[str, Any], facts: FolderFacts, fixed: Iterable[str], *, from_size: bool
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``config`` with the rules of ``settings`` (those with this ``from_size``) applied to
    every key the user did not set (``fixed``), and the record of what was chosen:
    {key: {"value", "default", "rule", "from"}}."""
    fixed = set(fixed)
    chosen, record = dict(config), {}
    for setting in settings:
        if setting.from_size != from_size or setting.key in fixed:
            continue
        value = setting.choose(facts, chosen)
        if value is None:  # the rule has nothing to go on (no size known): the default stays
            continue
        record[setting.key] = {"value": value, "default": config[setting.key], "rule": setting.rule, "from": facts.describe()}
        chosen[setting.key] = value
    return chosen, record


def describe_choices(settings: Sequence[AutoSetting], record: dict[str, dict[str, Any]]) -> str:
    """One line for the user: ``batch_size=24, step_size=2/255 (from 244 images, 2 classes)``."""
    by_key = {s.key: s for s in settings}
    values = ", ".join(f"{key}={by_key[key].shown(entry['value'])}" for key, entry in record.items())
    # Rules applied at different times saw the same folder: name each fact once.
    facts = list(dict.fromkeys(part for entry in record.values() for part in entry["from"].split(", ")))
    return f"{values} (from {', '.join(facts)})"


# ----------------------------------------------------------------------------------------------
# helpers for rules


def clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def batches_per_pass(images: int, batch_size: int) -> int:
    return max(1, math.ceil(images / batch_size))

"""Method configuration: dataclass defaults < ``configs/<method>.yaml`` < ``--set key=value``.

Unknown keys are errors at every level, so a typo never silently falls back to a default.
The default YAML files live in ``configs/`` at the top of the repository and ship inside the
package as ``protect.configs``; they are read through :mod:`importlib.resources`, so a wheel
install reads exactly the files a checkout does.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

CONFIG_PACKAGE = "protect.configs"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says which key and why."""


def parse_number(value: Any) -> float:
    """Accept floats, ints and fractions written as text (``"8/255"``)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        numerator, slash, denominator = value.strip().partition("/")
        if slash:
            if float(denominator) == 0:
                raise ValueError(f"expected a number, got {value!r} (division by zero)")
            return float(numerator) / float(denominator)
        return float(numerator)
    raise ValueError(f"expected a number, got {value!r}")


def _coerce(field: dataclasses.Field, value: Any, hints: dict[str, Any]) -> Any:
    kind = hints[field.name]
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        kind = options[0]
    if kind is float:
        return parse_number(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"expected text, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(kind) or (object,)
        if not isinstance(value, list) or (item is str and not all(isinstance(v, str) for v in value)):
            raise ValueError(f"expected a list{' of texts' if item is str else ''}, got {value!r}")
        return value
    return value


def packaged_config(name: str) -> Traversable:
    """A file shipped in ``configs/`` (the package ``protect.configs``), e.g. ``em-classwise.yaml``
    or ``relabel/cifar10-coarse.yaml``; it may not exist (check with ``is_file()``)."""
    node = resources.files(CONFIG_PACKAGE)
    for part in name.split("/"):
        node = node / part
    return node


def config_path_for(method: str) -> Traversable:
    """The default config of ``method``: ``configs/<method>.yaml``."""
    return packaged_config(f"{method}.yaml")


def read_default_config(name: str) -> tuple[str, dict[str, Any]]:
    """(where it is, its values) of a packaged default config; a missing one is an error, never
    an empty layer, because the dataclass defaults alone are not the documented defaults."""
    path = packaged_config(name)
    if not path.is_file():
        raise ConfigError(
            f"default config {name} not found in the installed package ({path}); the installation is "
            "incomplete: reinstall protect (configs/ ships inside the package as protect.configs)"
        )
    return str(path), read_yaml(path)


def read_yaml(path: Path | str | Traversable) -> dict[str, Any]:
    path = Path(path) if isinstance(path, str) else path
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["steps=20", "eps=8/255"]`` into a dict, values typed as YAML scalars."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            result[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: not a valid value ({getattr(exc, 'problem', None) or exc})") from None
    return result


def build_config(config_cls: type, *layers: tuple[str, dict[str, Any]]) -> Any:
    """Apply each ``(source, values)`` layer in order over the dataclass defaults."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values: dict[str, Any] = {}
    for source, layer in layers:
        for key, value in layer.items():
            if key not in fields:
                valid = ", ".join(sorted(fields))
                raise ConfigError(f"{source}: unknown key {key!r}; valid keys: {valid}")
            try:
                values[key] = _coerce(fields[key], value, hints)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{source}: {key}: {exc}") from None
    config = config_cls(**values)
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate()
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from None
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)

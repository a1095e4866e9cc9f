"""Protectors: a fitted generator's state kept in a folder, to protect later images (or later
exports) without fitting again.

A protector is ``protector.safetensors`` (the generator's tensors) and ``protector.json`` (the
method, its resolved config, the seed, the classes of class-wise noise, what it was fitted on).
It holds the noise itself: whoever has it can subtract the protection, so it is kept private.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from protect.config import ConfigError, config_to_dict
from protect.generator import Generator, resolve_config
from protect.images import sha256_file, write_text_atomic

PROTECTOR_TENSORS = "protector.safetensors"
PROTECTOR_META = "protector.json"


def save_protector(folder: Path, generator: Generator, meta: dict[str, Any]) -> None:
    """Write a fitted protector: tensors first, then the JSON naming them, each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PROTECTOR_TENSORS}.tmp"
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(tmp))
    tmp.replace(folder / PROTECTOR_TENSORS)
    write_text_atomic(folder / PROTECTOR_META, json.dumps(meta, indent=2, sort_keys=True) + "\n")


_META_KEYS = {"method": str, "config": dict, "seed": int, "classes": list}


def read_protector_meta(folder: Path | str) -> dict[str, Any]:
    """The JSON of a saved protector; FileNotFoundError naming the folder when it is not one,
    ConfigError naming the file when it is damaged."""
    path = Path(folder) / PROTECTOR_META
    if not path.is_file() or not (Path(folder) / PROTECTOR_TENSORS).is_file():
        raise FileNotFoundError(f"{folder}: not a saved protector (expected {PROTECTOR_TENSORS} and {PROTECTOR_META})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: damaged protector description, not valid JSON ({exc})") from None
    wrong = [key for key, kind in _META_KEYS.items() if not isinstance(meta, dict) or not isinstance(meta.get(key), kind)]
    if wrong:
        raise ConfigError(f"{path}: damaged protector description ({', '.join(wrong)} missing or of the wrong type)")
    return meta


def read_protector_tensors(folder: Path | str) -> dict[str, torch.Tensor]:
    """The tensors of a saved protector, checked to be finite; ConfigError naming the file otherwise."""
    path = Path(folder) / PROTECTOR_TENSORS
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{path}: damaged protector tensors, not a readable safetensors file ({exc})") from None
    broken = sorted(name for name, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all())
    if broken:
        raise ConfigError(f"{path}: damaged protector: {', '.join(broken)} hold NaN or inf")
    return tensors


def resolve_with_protector(
    method: str, eps: float | None, config_file: Path | None, overrides: dict[str, Any] | None, protector: Path | str | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The resolved config of a job, and the saved protector's metadata (with the digest of
    its tensors) when one is reused; a reused protector brings its own config."""
    if protector is None:
        return config_to_dict(resolve_config(method, config_file=config_file, overrides=overrides, eps=eps)), None
    meta = read_protector_meta(protector)
    read_protector_tensors(protector)
    meta["digest"] = sha256_file(Path(protector) / PROTECTOR_TENSORS)
    if meta["method"] != method:
        raise ConfigError(f"{protector} is a {meta['method']} protector, not {method}")
    if eps is not None or config_file is not None or overrides:
        raise ConfigError("a saved protector brings its own config; drop --eps, --config and --set when reusing one")
    return meta["config"], meta

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

from safetensors.torch import save_file

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


def read_protector_meta(folder: Path | str) -> dict[str, Any]:
    """The JSON of a saved protector; FileNotFoundError naming the folder when it is not one."""
    path = Path(folder) / PROTECTOR_META
    if not path.exists() or not (Path(folder) / PROTECTOR_TENSORS).exists():
        raise FileNotFoundError(f"{folder}: not a saved protector (expected {PROTECTOR_TENSORS} and {PROTECTOR_META})")
    return json.loads(path.read_text(encoding="utf-8"))


def resolve_with_protector(
    method: str, eps: float | None, config_file: Path | None, overrides: dict[str, Any] | None, protector: Path | str | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The resolved config of a job, and the saved protector's metadata (with the digest of
    its tensors) when one is reused; a reused protector brings its own config."""
    if protector is None:
        return config_to_dict(resolve_config(method, config_file=config_file, overrides=overrides, eps=eps)), None
    meta = read_protector_meta(protector)
    meta["digest"] = sha256_file(Path(protector) / PROTECTOR_TENSORS)
    if meta["method"] != method:
        raise ConfigError(f"{protector} is a {meta['method']} protector, not {method}")
    if eps is not None or config_file is not None or overrides:
        raise ConfigError("a saved protector brings its own config; drop --eps, --config and --set when reusing one")
    return meta["config"], meta

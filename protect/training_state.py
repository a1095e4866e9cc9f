"""Resumable training: a network (or any module holding the tensors being optimised), its
optimizer, optionally its LR schedule and a random generator, and a JSON record, saved after an
epoch or step as ``STEM.safetensors`` + ``STEM.json`` and loaded without pickle.

The record carries an ``identity`` (data, config, seed): a checkpoint is only resumed by the
same training, so a stale file is refused instead of silently continuing another run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save

from protect.images import atomic_open, write_text_atomic


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be resumed; the message names its files and what to do."""


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """A short digest of the tensors' contents, in order: names the data a training saw."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def checkpoint_files(stem: Path) -> tuple[Path, Path]:
    """The tensor file and the JSON record of the checkpoint at ``stem``."""
    stem = Path(stem)
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_training_state(
    stem: Path, net: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any | None, rng: torch.Generator | None,
    record: dict[str, Any],
) -> None:
    """Write the checkpoint; ``record`` (JSON-able) must hold ``identity`` and ``step``.

    Tensors first, then the record naming their step: a crash between the two leaves a pair
    whose steps disagree, which :func:`load_training_state` reports instead of mixing them."""
    tensors_path, record_path = checkpoint_files(stem)
    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    for index, entry in optimizer_state["state"].items():
        for name, value in entry.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    if rng is not None:
        tensors["rng"] = rng.get_state()
    tensors["step"] = torch.tensor([record["step"]])
    with atomic_open(tensors_path, "wb") as handle:
        handle.write(save(tensors))
    optimizer_record = {
        "param_groups": optimizer_state["param_groups"],
        "state_keys": {str(index): sorted(entry) for index, entry in optimizer_state["state"].items()},
    }
    write_text_atomic(record_path, json.dumps({**record, "optimizer": optimizer_record, "schedule": schedule.state_dict() if schedule is not None else None}))


def load_training_state(
    stem: Path, net: nn.Module, optimizer: torch.optim.Optimizer, schedule: Any | None, rng: torch.Generator | None,
    identity: dict[str, Any],
) -> dict[str, Any] | None:
    """Restore the checkpoint at ``stem`` into the given objects and return its record, or
    return None when there is no checkpoint. Raises :class:`CheckpointError` when it belongs
    to another training (its identity differs) or its two files disagree."""
    tensors_path, record_path = checkpoint_files(stem)
    if not (tensors_path.exists() and record_path.exists()):
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if record.get("identity") != identity:
        raise CheckpointError(
            f"{tensors_path.parent} holds a checkpoint ({tensors_path.name}) of another training (other data, "
            f"config or seed); use a new output folder, or delete {tensors_path.name} and {record_path.name} "
            "to start again"
        )
    tensors = load_file(str(tensors_path))
    if int(tensors["step"][0]) != record["step"]:
        raise CheckpointError(
            f"{tensors_path} and {record_path.name} are from different steps (interrupted while saving); "
            "delete both to start again"
        )
    net.load_state_dict({k[len("net."):]: v for k, v in tensors.items() if k.startswith("net.")})
    state = {int(index): {name: tensors[f"optimizer.{index}.{name}"] for name in names}
             for index, names in record["optimizer"]["state_keys"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": record["optimizer"]["param_groups"]})
    if schedule is not None:
        schedule.load_state_dict(record["schedule"])
    if rng is not None:
        rng.set_state(tensors["rng"])
    return record


def remove_training_state(stem: Path) -> None:
    """Delete the checkpoint at ``stem`` (once what it was for is stored elsewhere)."""
    for path in checkpoint_files(stem):
        path.unlink(missing_ok=True)

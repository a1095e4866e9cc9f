"""What a computation ran on (hardware, in words; package versions), for records that may come
from several machines."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import torch


def device_description(device: torch.device) -> str:
    """The hardware behind ``device``, e.g. "AMD EPYC CPU, 2 threads" or "NVIDIA H200 GPU"."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} GPU"
    if device.type != "cpu":
        return str(device)
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")), "")
    threads = torch.get_num_threads()
    return f"{model or platform.machine()} CPU, {threads} thread{'s' * (threads != 1)}"


def _cpuinfo_lines() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return []


def package_versions() -> dict[str, str]:
    """Python's and the relevant packages' versions ("not installed" for a missing one)."""
    versions = {"python": platform.python_version()}
    for name in ("protect", "torch", "torchvision", "numpy", "pillow", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions

"""Mixed precision: one rule for every generation and training loop.

``auto`` turns bf16 autocast on only where it is faster than float32: on GPUs with bf16
support and on CPUs whose oneDNN kernels handle bf16 natively (AVX-512 or AMX). On other CPUs
(AVX2 only, e.g. many AMD EPYC and older Intel parts) bf16 is emulated and a convolutional
network trains 8-12x slower in bf16 than in float32, so ``auto`` stays in float32 there.
"""

from __future__ import annotations

import functools

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, bf16 or fp32; got {precision!r}")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions and matrix products natively (oneDNN's check)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain float32."""
    check_precision(precision)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else None
    return None


def resolved_precision(device: torch.device, precision: str) -> str:
    """What ``precision`` computes in on ``device``: "bf16" or "fp32" (``auto`` resolved)."""
    return "fp32" if autocast_dtype(device, precision) is None else "bf16"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """An autocast context for ``precision`` on ``device`` (disabled for float32)."""
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

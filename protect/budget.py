"""Shared perturbation maths: the L-inf ball, the valid pixel range and 8-bit rounding.

Every method goes through these functions, so the budget is enforced in one place.
Float tensors hold pixels in [0, 1]; uint8 tensors/arrays hold pixels in [0, 255].
"""

from __future__ import annotations

import numpy as np
import torch


class BudgetError(RuntimeError):
    """A written image would differ from its original by more than the budget allows."""


def budget_in_levels(eps: float) -> int:
    """The L-inf budget in 8-bit levels, ``round(eps * 255)``, as checked on written files."""
    return int(round(eps * 255))


def project_linf(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Project a perturbation onto the L-inf ball of radius ``eps``."""
    return delta.clamp(-eps, eps)


def project_to_valid(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Return the perturbation that keeps ``x + delta`` within the eps ball and inside [0, 1]."""
    return (x + project_linf(delta, eps)).clamp(0.0, 1.0) - x


def signed_gradient_step(delta: torch.Tensor, grad: torch.Tensor, step_size: float, descend: bool) -> torch.Tensor:
    """One PGD step on the sign of the gradient (L-inf steepest direction)."""
    direction = -1.0 if descend else 1.0
    return delta + direction * step_size * grad.sign()


def apply_perturbation_uint8(image: np.ndarray, delta: np.ndarray, eps: float) -> np.ndarray:
    """Add a float perturbation (in [0,1] units, HxWx3) to a uint8 HxWx3 image.

    The result is rounded to 8 bits and clipped to [0, 255]; the difference to the original is
    then clipped to ``round(eps*255)`` levels, so the budget holds exactly on the written pixels.
    """
    levels = budget_in_levels(eps)
    original = image.astype(np.int16)
    step = np.rint(delta.astype(np.float32) * 255.0).astype(np.int16)
    step = np.clip(step, -levels, levels)
    out = np.clip(original + step, 0, 255).astype(np.uint8)
    check_budget(image, out, eps)
    return out


def check_budget(original: np.ndarray, protected: np.ndarray, eps: float, name: str = "image") -> int:
    """Raise :class:`BudgetError` unless ``max |protected - original| <= round(eps*255)``.

    Returns the largest difference found, in 8-bit levels.
    """
    if original.shape != protected.shape:
        raise BudgetError(f"{name}: shape changed from {original.shape} to {protected.shape}")
    diff = int(np.abs(original.astype(np.int16) - protected.astype(np.int16)).max(initial=0))
    limit = budget_in_levels(eps)
    if diff > limit:
        raise BudgetError(f"{name}: max |out - in| = {diff} levels exceeds the budget of {limit}")
    return diff

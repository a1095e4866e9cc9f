"""Shared perturbation maths: the L-inf ball, the valid pixel range and 8-bit rounding.

Every method goes through these functions, so the budget is enforced in one place.
Float tensors hold pixels in [0, 1]; uint8 tensors/arrays hold pixels in [0, 255].
"""

from __future__ import annotations

import math

import numpy as np
import torch


#: the largest budget accepted, in 8-bit levels: noise beyond 32/255 is plainly visible, and
#: this tool makes imperceptible noise
MAX_EPS_LEVELS = 32


class BudgetError(RuntimeError):
    """A written image would differ from its original by more than the budget allows."""


def check_eps(eps: float) -> None:
    """Raise ValueError unless ``eps`` (in [0, 1] pixel units) rounds to 1..MAX_EPS_LEVELS
    levels: a smaller budget changes no pixel, a larger one is visible."""
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1) pixel units, e.g. 8/255; got {eps}")
    levels = budget_in_levels(eps)
    if levels < 1:
        raise ValueError(f"eps {eps:g} rounds to 0 levels of 255: no pixel would change; use at least 1/255 (8/255 is usual)")
    if levels > MAX_EPS_LEVELS:
        raise ValueError(
            f"eps {eps:g} is {levels}/255: noise larger than {MAX_EPS_LEVELS}/255 is plainly visible; "
            "the papers use 8/255 or 16/255"
        )


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


def perturb_uint8(images: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Add a float perturbation (in [0,1] units) to uint8 images of the same shape.

    The step is rounded to 8-bit levels and clipped to ``round(eps*255)`` levels, then the sum
    to [0, 255], so the budget holds exactly on the written pixels.
    """
    levels = budget_in_levels(eps)
    step = torch.round(delta.float() * 255.0).clamp(-levels, levels).to(torch.int16)
    return (images.to(torch.int16) + step).clamp(0, 255).to(torch.uint8)


def apply_perturbation_uint8(image: np.ndarray, delta: np.ndarray, eps: float) -> np.ndarray:
    """:func:`perturb_uint8` for one HxWx3 numpy image, with the budget re-checked."""
    out = perturb_uint8(torch.from_numpy(image), torch.from_numpy(np.ascontiguousarray(delta)), eps).numpy()
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

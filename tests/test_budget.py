"""The L-inf budget: rounding to 8 bits, clipping to the pixel range, and the final check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protect.budget import (
    BudgetError,
    apply_perturbation_uint8,
    budget_in_levels,
    check_budget,
    project_linf,
    project_to_valid,
)

EPS = 8 / 255


@pytest.mark.parametrize("eps", [8 / 255, 4 / 255, 16 / 255, 0.03])
@pytest.mark.parametrize("fill", ["random", "near0", "near255"])
def test_apply_perturbation_stays_in_budget_after_rounding(eps: float, fill: str) -> None:
    rng = np.random.default_rng(0)
    shape = (17, 23, 3)
    if fill == "random":
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    elif fill == "near0":
        image = rng.integers(0, 4, size=shape, dtype=np.uint8)
    else:
        image = rng.integers(252, 256, size=shape, dtype=np.uint8)
    # Perturbations up to 3x the budget, plus values that round exactly at the edge.
    delta = rng.uniform(-3 * eps, 3 * eps, size=shape).astype(np.float32)
    delta[0, 0] = [eps + 0.49 / 255, -eps - 0.49 / 255, eps]

    out = apply_perturbation_uint8(image, delta, eps)

    assert out.dtype == np.uint8 and out.shape == image.shape
    diff = np.abs(out.astype(np.int16) - image.astype(np.int16))
    assert diff.max() <= round(eps * 255)
    assert diff.max() == budget_in_levels(eps)  # large deltas use the whole budget (where not clipped)
    assert check_budget(image, out, eps) == diff.max()


def test_apply_perturbation_clips_to_pixel_range() -> None:
    image = np.array([[[0, 255, 128]]], dtype=np.uint8)
    out = apply_perturbation_uint8(image, np.array([[[-1.0, 1.0, 0.0]]]), EPS)
    assert out.tolist() == [[[0, 255, 128]]]
    out = apply_perturbation_uint8(image, np.array([[[1.0, -1.0, -1.0]]]), EPS)
    assert out.tolist() == [[[8, 247, 120]]]


def test_check_budget_raises_on_violation() -> None:
    image = np.full((4, 5, 3), 100, dtype=np.uint8)
    bad = image.copy()
    bad[2, 3, 1] = 100 + budget_in_levels(EPS) + 1
    with pytest.raises(BudgetError, match="9 levels exceeds the budget of 8"):
        check_budget(image, bad, EPS)
    bad[2, 3, 1] = 100 - budget_in_levels(EPS)  # exactly at the budget is fine
    assert check_budget(image, bad, EPS) == 8


def test_check_budget_raises_on_shape_change() -> None:
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    with pytest.raises(BudgetError, match="shape changed"):
        check_budget(image, np.zeros((5, 4, 3), dtype=np.uint8), EPS, name="a.png")


def test_check_budget_near_extremes_without_wraparound() -> None:
    # uint8 arithmetic would wrap 0 - 255 to 1; the check must see 255 levels.
    with pytest.raises(BudgetError):
        check_budget(np.zeros((1, 1, 3), np.uint8), np.full((1, 1, 3), 255, np.uint8), EPS)


def test_project_to_valid_keeps_range_and_budget() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((8, 3, 16, 16), generator=gen)
    x[0] = 0.0
    x[1] = 1.0
    x[2, :, :8] = 0.001
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * 0.5  # far outside the ball
    eps = 8 / 255
    out = project_to_valid(x, delta, eps)
    assert out.abs().max() <= eps + 1e-6
    assert (x + out).min() >= 0.0 and (x + out).max() <= 1.0
    # Where neither constraint binds, the perturbation is unchanged.
    small = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps * 0.5
    inner = (x > eps) & (x < 1 - eps)
    assert torch.allclose(project_to_valid(x, small, eps)[inner], small[inner], atol=1e-6)


def test_project_linf() -> None:
    delta = torch.tensor([-1.0, -0.01, 0.0, 0.01, 1.0])
    assert torch.equal(project_linf(delta, 0.02), torch.tensor([-0.02, -0.01, 0.0, 0.01, 0.02]))

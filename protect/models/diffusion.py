"""Denoising diffusion networks (diffusers' ``UNet2DModel``), built from config and randomly
initialised: no weights are fetched. diffusers is optional (``pip install 'protect[diffusers]'``)
and imported only here, when a network is built."""

from __future__ import annotations

import math
from typing import Any

import torch

DIFFUSERS_HINT = "this needs diffusers: pip install 'protect[diffusers]'"


def diffusers_module() -> Any:
    """The diffusers package, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as exc:  # depends on the install
        raise ImportError(DIFFUSERS_HINT) from exc
    return diffusers


def build_unet(
    size: int, channels: tuple[int, ...] = (32, 64, 64), *, layers_per_block: int = 1, norm_groups: int = 16,
    seed: int = 0,
) -> Any:
    """A noise-predicting ``UNet2DModel`` for RGB images of ``size`` px: one level per entry of
    ``channels`` (widths), plain ResNet blocks (diffusers' default attention sits only in the
    middle block), group norm with ``norm_groups`` (reduced to divide every width). Weights are
    drawn from ``seed`` without touching the global generator."""
    diffusers = diffusers_module()
    levels = len(channels)
    with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global generator
        torch.manual_seed(seed)
        return diffusers.UNet2DModel(
            sample_size=size, in_channels=3, out_channels=3, block_out_channels=tuple(channels),
            down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
            layers_per_block=layers_per_block, norm_num_groups=math.gcd(norm_groups, *channels),
        )


def build_ddpm_scheduler(num_train_timesteps: int = 1000) -> Any:
    """The DDPM noise schedule of Ho et al. 2020 (arXiv:2006.11239): linear betas 1e-4..0.02."""
    return diffusers_module().DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear",
                                            beta_start=1e-4, beta_end=0.02)

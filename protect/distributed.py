"""Data-parallel fitting on several devices with torch.distributed.

A method that optimises over the whole set (min-min error-minimising noise) can fit on several
GPUs (or CPU processes) at once: one process per device, each holding the whole fit set. Every
batch is split into one contiguous share per process; gradients of the surrogate are summed
across processes (weighted by share, so a step equals the step on the whole batch), batch-norm
statistics are averaged, and the noise computed for each share is gathered, so every process
holds the same surrogate and the same noise after every step. Process 0 saves the result.

NCCL is used when every device is a GPU, Gloo otherwise (CPU processes: tests, and machines
without GPUs). Batch norm runs on each process's share, as in ``DistributedDataParallel``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from protect.generator import MethodConfig, create_generator, method_class
from protect.ranks import Ranks


class DistributedFitError(RuntimeError):
    """A data-parallel fit could not start or one of its processes failed."""


def check_devices(devices: list[str]) -> str:
    """The backend for ``devices`` (one process each); :class:`DistributedFitError` if unusable."""
    if len(devices) < 2:
        raise DistributedFitError("a data-parallel fit needs at least two devices, e.g. cuda:0,cuda:1")
    parsed = [torch.device(d) for d in devices]
    cuda = [d for d in parsed if d.type == "cuda"]
    if cuda:
        if len(cuda) != len(parsed):
            raise DistributedFitError(f"mix of GPU and other devices: {', '.join(devices)}; use GPUs only or CPUs only")
        if not torch.cuda.is_available():
            raise DistributedFitError("CUDA devices were asked for but torch sees no GPU")
        indices = [d.index or 0 for d in cuda]
        if len(set(indices)) != len(indices):
            raise DistributedFitError(f"each process needs its own GPU; {', '.join(devices)} repeats one")
        missing = [i for i in indices if i >= torch.cuda.device_count()]
        if missing:
            raise DistributedFitError(f"GPU {missing[0]} not found: torch sees {torch.cuda.device_count()}")
        return "nccl"
    if any(d.type != "cpu" for d in parsed):
        raise DistributedFitError(f"data-parallel fits run on CUDA GPUs or CPU processes, not {', '.join(devices)}")
    return "gloo"


def fit_data_parallel(
    method: str,
    config: MethodConfig,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    devices: list[str],
    *,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fit ``method`` on ``images`` (uint8, N x 3 x R x R) with one process per device; returns
    the fitted generator's state dict and its fit summary (load them into a generator made
    with the same config and seed)."""
    if not method_class(method).data_parallel_fit:
        raise DistributedFitError(f"{method} fits on one device; a data-parallel fit is available for error-minimising methods")
    backend = check_devices(devices)
    with tempfile.TemporaryDirectory(prefix="protect-fit-") as tmp:
        folder = Path(tmp)
        torch.save({"images": images, "labels": labels}, folder / "data.pt")
        try:
            mp.start_processes(
                _fit_worker, args=(method, config, seed, devices, backend, str(folder)), nprocs=len(devices),
                start_method="spawn", join=True,
            )
        except mp.ProcessRaisedException as exc:
            raise DistributedFitError(f"a fitting process failed: {str(exc).strip().splitlines()[-1]}") from exc
        except mp.ProcessExitedException as exc:
            raise DistributedFitError(f"a fitting process exited unexpectedly: {exc}") from exc
        state = load_file(str(folder / "state.safetensors"))
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return state, summary


def _fit_worker(rank: int, method: str, config: MethodConfig, seed: int, devices: list[str], backend: str, folder: str) -> None:
    world = len(devices)
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        data = torch.load(Path(folder) / "data.pt", weights_only=True)  # written by the parent just now
        generator = create_generator(method, config, device=device, seed=seed)
        generator.ranks = Ranks(rank, world)
        generator.fit(data["images"], data["labels"])
        if rank == 0:
            save_file({k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}, f"{folder}/state.safetensors")
            Path(folder, "summary.json").write_text(json.dumps(generator.fit_summary()), encoding="utf-8")
        dist.barrier()
    finally:
        dist.destroy_process_group()

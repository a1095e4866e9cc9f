"""The processes a fit runs in, and the collectives a data-parallel fit needs.

With one process (:data:`SINGLE_PROCESS`) every method is a no-op, so a method's single-device
code path is the data-parallel one with ``world == 1``. :mod:`protect.distributed` starts the
processes; methods only see a :class:`Ranks`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """The processes a fit runs in: this process's ``rank`` among ``world``. With one process
    every method is a no-op, so single-device code paths are unchanged."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, indices: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of a batch (possibly empty for a tiny batch)."""
        return indices.tensor_split(self.world)[self.rank] if self.distributed else indices

    def gather(self, part: torch.Tensor, total: int) -> torch.Tensor:
        """Every process's ``part`` of a batch of ``total`` items (shares as :meth:`share`),
        concatenated in rank order; the same tensor on every process."""
        if not self.distributed:
            return part
        sizes = [len(s) for s in torch.arange(total).tensor_split(self.world)]
        padded = part.new_zeros((max(sizes), *part.shape[1:]))
        padded[: len(part)] = part
        slots = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(slots, padded.contiguous())
        return torch.cat([slot[:size] for slot, size in zip(slots, sizes)])

    def sum_gradients(self, model: torch.nn.Module, weight: float) -> None:
        """Replace every gradient by the sum over processes of ``weight`` x the local one
        (weight = share / batch, so the result is the gradient of the whole batch's mean loss)."""
        if not self.distributed:
            return
        for param in model.parameters():
            if not param.requires_grad:
                continue
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            grad = grad * weight
            dist.all_reduce(grad)
            param.grad = grad

    def average_buffers(self, model: torch.nn.Module) -> None:
        """Average floating-point buffers (batch-norm running statistics) over processes."""
        if not self.distributed:
            return
        for buffer in model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer.div_(self.world)

    def total(self, value: float) -> float:
        """The sum of ``value`` over processes."""
        if not self.distributed:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor)
        return float(tensor.item())


SINGLE_PROCESS = Ranks()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

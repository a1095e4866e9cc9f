"""Data-parallel fitting (torch.distributed, Gloo on two CPU processes): the collective helpers
give what one process computes on the whole batch, and a data-parallel min-min fit behaves
like a single-process one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from protect.distributed import DistributedFitError, check_devices, fit_data_parallel
from protect.generator import create_generator, resolve_config
from protect.ranks import Ranks
from protect.runner import UsageError, protect_export
from protect.surrogates import sgd_step

def _problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images = torch.rand(7, 3, 2, 2)  # 7 = an uneven split over two processes
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    return model, images, labels


def _collectives_worker(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    try:
        ranks = Ranks(rank, 2)
        model, images, labels = _problem()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        idx = torch.arange(len(images))
        mine = ranks.share(idx)
        for _ in range(3):
            sgd_step(model, optimizer, images[mine], labels[mine], torch.autocast("cpu", enabled=False), ranks=ranks,
                     share=len(mine) / len(idx))
        gathered = ranks.gather(images[mine].flatten(1) * 2, len(idx))
        total = ranks.total(float(len(mine)))
        torch.save({"weights": model.state_dict(), "gathered": gathered, "total": total}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_collectives_match_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    mp.start_processes(_collectives_worker, args=(str(tmp_path),), nprocs=2, start_method="spawn", join=True)
    model, images, labels = _problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(result["weights"][name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["gathered"], images.flatten(1) * 2)
        assert result["total"] == len(images)


def test_one_process_ranks_change_nothing() -> None:
    ranks = Ranks()
    idx = torch.arange(5)
    assert torch.equal(ranks.share(idx), idx)
    assert torch.equal(ranks.gather(idx, 5), idx)
    assert ranks.total(3.0) == 3.0


def _classes(n: int = 256, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images whose brightness depends on the class."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    images = (torch.rand((n, 3, 32, 32), generator=generator) * 160 + labels[:, None, None, None] * 30).to(torch.uint8)
    return images, labels


def test_batch_fit_on_two_processes_matches_a_one_process_fit(tmp_path: Path) -> None:
    images, labels = _classes()
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "src" / f"class{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    settings = {"batch_size": 64, "max_rounds": 3}
    summary = protect_export("em-classwise", tmp_path / "src", tmp_path / "out", overrides=settings, unit_size=128, workers=1,
                             fit_devices=["cpu", "cpu"], save_protector_to=tmp_path / "kept")
    assert summary.exit_code == 0 and summary.fit.startswith("once")
    meta = json.loads((tmp_path / "kept" / "protector.json").read_text(encoding="utf-8"))
    assert meta["fit"]["devices"] == ["cpu", "cpu"] and meta["fit"]["rounds_run"] >= 1
    noise = load_file(str(tmp_path / "kept" / "protector.safetensors"))["noise"]
    assert noise.shape == (4, 3, 32, 32) and float(noise.abs().max()) <= 8 / 255 + 1e-6

    # The same fit in one process: same start, batches and steps, up to batch norm on each
    # process's half of a batch, so the class noise points the same way for most pixels.
    order = torch.argsort(labels, stable=True)  # the export's order: class folder, then name
    single = create_generator("em-classwise", resolve_config("em-classwise", overrides=settings), seed=0)
    single.fit(images[order], labels[order])
    agreement = float((torch.sign(noise) == torch.sign(single.noise)).float().mean())
    assert agreement > 0.7, agreement


def test_device_lists_are_checked(tmp_path: Path) -> None:
    assert check_devices(["cpu", "cpu"]) == "gloo"
    with pytest.raises(DistributedFitError, match="at least two"):
        check_devices(["cpu"])
    with pytest.raises(DistributedFitError, match="mix"):
        check_devices(["cpu", "cuda:0"])
    with pytest.raises(DistributedFitError, match="one device"):
        fit_data_parallel("bayes", resolve_config("bayes"), *_classes(8), ["cpu", "cpu"])
    with pytest.raises(UsageError, match="fits per unit"):
        protect_export("em-samplewise", tmp_path, tmp_path / "out", fit_devices=["cpu", "cpu"])

"""protect verify: countermeasures, victims, the runner and the protection card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from attacks.countermeasures import COUNTERMEASURES, build_countermeasure
from attacks.data import ImageSet
from attacks.report import _precision_text
from attacks.train import VICTIM_LR, TrainConfig, train_classifier
from attacks.verify import VerifyError, load_verify_data, make_plan
from protect import precision
from protect.cli import app
from protect.hardware import device_description
from protect.models import CLASSIFIERS, build_classifier
from protect.runner import protect_folder
from protect.training_state import CheckpointError



def _easy_set(n_per_class: int, seed: int) -> ImageSet:
    """Two classes a victim must separate: reddish vs bluish images (invariant to crop and flip)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand((2 * n_per_class, 3, 32, 32), generator=gen) * 0.4
    images[:n_per_class, 0] += 0.5
    images[n_per_class:, 2] += 0.5
    labels = torch.tensor([0] * n_per_class + [1] * n_per_class)
    return ImageSet((images.clamp(0, 1) * 255).to(torch.uint8), labels, ["red", "blue"], [""] * len(labels))


# diffusion-purify needs a purifier checkpoint: tests/test_purify.py runs it with a tiny one.
@pytest.mark.parametrize("name", [n for n in COUNTERMEASURES if n not in ("none", "mix", "diffusion-purify")])
def test_countermeasure_keeps_shape_dtype_range(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand((6, 3, 32, 32), generator=gen) * 255).to(torch.uint8)
    countermeasure = build_countermeasure(name)
    if countermeasure.data_transform is not None:
        out = countermeasure.data_transform(images, gen)
        assert out.shape == images.shape and out.dtype == torch.uint8
        assert not torch.equal(out, images), f"{name} changed nothing"
    else:
        model = build_classifier("small-cnn", 10)
        x = images.float() / 255
        loss = countermeasure.batch_loss(model, x, torch.arange(6) % 10, gen)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_countermeasure_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="available: none, jpeg"):
        build_countermeasure("sharpen")


@pytest.mark.parametrize("victim", list(CLASSIFIERS))
def test_each_victim_learns_easy_data(victim: str) -> None:
    train, test = _easy_set(64, seed=0), _easy_set(32, seed=1)
    # Small batches on a tiny set: a learning rate below the full-data ones keeps every victim stable.
    lr = min(VICTIM_LR[victim], 0.02)
    result = train_classifier(build_classifier(victim, 2), train, test, TrainConfig(epochs=4, batch_size=16, lr=lr), seed=0)
    assert result.final >= 0.8, f"{victim} reached only {result.final:.2f} on a trivially separable task"


def test_interrupted_training_resumes_to_the_same_model(tmp_path: Path) -> None:
    train, test = _easy_set(24, seed=0), _easy_set(8, seed=1)
    config = TrainConfig(epochs=3, batch_size=16, lr=0.02)
    # mixup and JPEG draw from the run's random generator, so its state must survive the resume too
    mixup, jpeg = build_countermeasure("mixup").batch_loss, build_countermeasure("jpeg").data_transform

    def run(model: torch.nn.Module, **kwargs) -> object:
        return train_classifier(model, train, test, config, seed=5, batch_loss=mixup, data_transform=jpeg, **kwargs)

    whole_model = build_classifier("small-cnn", 2, seed=1)
    whole = run(whole_model)

    def stop_after_second(epoch: int, accuracy: float) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    stem = tmp_path / "cell.partial"
    with pytest.raises(KeyboardInterrupt):
        run(build_classifier("small-cnn", 2, seed=1), checkpoint=stem, on_epoch=stop_after_second)
    assert json.loads((tmp_path / "cell.partial.json").read_text())["test_accuracy"] == whole.test_accuracy[:2]
    seen = []
    resumed_model = build_classifier("small-cnn", 2, seed=1)
    resumed = run(resumed_model, checkpoint=stem, on_epoch=lambda epoch, accuracy: seen.append(epoch))
    assert resumed.resumed_from_epoch == 2 and seen == [0, 1, 2]
    assert resumed.test_accuracy == whole.test_accuracy
    for (name, value), other in zip(whole_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(value, other), name
    # a checkpoint of another training (here: another seed) is refused, not continued
    with pytest.raises(CheckpointError, match="another training"):
        train_classifier(build_classifier("small-cnn", 2), train, test, config, seed=6, checkpoint=stem)



def test_a_run_resumed_on_a_machine_with_another_precision_records_both(tmp_path: Path, monkeypatch) -> None:
    train, test = _easy_set(8, seed=0), _easy_set(4, seed=1)
    config, stem = TrainConfig(epochs=2, batch_size=4, lr=0.02), tmp_path / "cell.partial"

    def stop_after_first(epoch: int, accuracy: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)  # ``auto`` trains in bf16 here...
    with pytest.raises(KeyboardInterrupt):
        train_classifier(build_classifier("small-cnn", 2), train, test, config, checkpoint=stem, on_epoch=stop_after_first)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)  # ... and in float32 on the next machine
    resumed = train_classifier(build_classifier("small-cnn", 2), train, test, config, checkpoint=stem)
    assert resumed.resumed_from_epoch == 1 and resumed.precision == ["bf16", "fp32"]
    card_text = _precision_text([{"precision": "bf16+fp32"}, {"precision": "fp32"}])
    assert card_text == "epochs in bf16 autocast and float32 (resumed on another machine) for 1 run, float32 for 1 run"

def _write_folder(root: Path, set_: ImageSet) -> None:
    for i, (img, label) in enumerate(zip(set_.images, set_.labels)):
        folder = root / set_.classes[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")


def test_mismatched_missing_and_single_class_inputs_are_clear_errors(tmp_path: Path) -> None:
    train, test = _easy_set(4, 0), _easy_set(2, 1)
    _write_folder(tmp_path / "train", train)
    _write_folder(tmp_path / "test", test)
    protect_folder("random", tmp_path / "train", tmp_path / "prot")
    with pytest.raises(VerifyError, match="--test folder not found"):
        load_verify_data(tmp_path / "prot", tmp_path / "train", tmp_path / "nowhere")
    other = tmp_path / "other"
    _write_folder(other, _easy_set(4, 5))
    (other / "red" / "0000.png").unlink()
    with pytest.raises(VerifyError, match="do not match.*red/0000.png"):
        load_verify_data(tmp_path / "prot", other, tmp_path / "test")
    single = ImageSet(train.images[:4], train.labels[:4], train.classes, [""] * 4)
    _write_folder(tmp_path / "one", single)
    protect_folder("random", tmp_path / "one", tmp_path / "prot-one")
    with pytest.raises(VerifyError, match="only one class"):
        load_verify_data(tmp_path / "prot-one", tmp_path / "one", tmp_path / "test")
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "prot"), "--clean-train", str(tmp_path / "train"),
                                      "--test", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "--test folder not found" in result.output


def test_plan_expansion_and_errors() -> None:
    plan = make_plan("quick")
    names = [name for name, _ in plan.countermeasures]
    assert names == ["none", "jpeg", "grayscale", "adv-training", "mix"]
    cells = plan.cells()
    assert not any(c.countermeasure == "mix" and c.data == "clean" for c in cells)
    assert sorted(c.data for c in cells if c.countermeasure == "mix") == ["clean-part", "control", "protected"]
    assert not any(c.countermeasure == "adv-training" and c.data != "protected" for c in cells)
    assert len(cells) == 3 * 3 + 3 + 1
    assert make_plan("quick", victims=["vgg11"], epochs=2, seeds=2).seeds == {"vgg11": 2}
    with pytest.raises(VerifyError, match="unknown victim"):
        make_plan("quick", victims=["alexnet"])
    with pytest.raises(VerifyError, match="unknown countermeasure"):
        make_plan("quick", countermeasures=["sharpen"])


@pytest.mark.slow
def test_verify_end_to_end_on_real_data(cifar_small: dict, tmp_path: Path) -> None:
    runner = CliRunner()
    args = [
        "verify", str(cifar_small["em"]), "--clean-train", str(cifar_small["clean"]), "--test", str(cifar_small["test"]),
        "--countermeasures", "none", "--epochs", "10", "--out", str(tmp_path / "report"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "small-cnn / none / protected / seed 0: test acc" in result.output, "no per-epoch lines without a terminal"
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    row = report["rows"][0]
    print({k: round(row[k]["final"]["mean"], 3) for k in ("clean", "control", "protected")})
    assert row["clean"]["final"]["mean"] >= 0.40
    assert row["verdict"]["protected"] is True, row
    card = (tmp_path / "report" / "report.md").read_text()
    assert "| small-cnn | none |" in card and "protected" in card
    for plot in ("curves.png", "matrix.png", "examples.png"):
        with Image.open(tmp_path / "report" / plot) as image:
            assert image.size[0] > 100
    # A second run reuses the finished cells instead of retraining.
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "already done" in again.output
    assert not list((tmp_path / "report" / "cells").glob("*.partial.*")), "finished runs leave no epoch checkpoints"


def test_baselines_are_shared_between_protected_folders_of_the_same_clean_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import attacks.verify as verify

    _write_folder(tmp_path / "train", _easy_set(6, 0))
    _write_folder(tmp_path / "test", _easy_set(3, 1))
    _write_folder(tmp_path / "other-train", _easy_set(6, 2))
    for name, train, seed in (("a", "train", 0), ("b", "train", 1), ("c", "other-train", 0)):
        protect_folder("random", tmp_path / train, tmp_path / name, seed=seed)
    trained: list[tuple[str, str]] = []
    real_run_cell = verify.run_cell

    def counting_run_cell(cell: verify.Cell, *args: object, **kwargs: object) -> dict:
        trained.append((cell.data, cell.countermeasure))
        return real_run_cell(cell, *args, **kwargs)

    monkeypatch.setattr(verify, "run_cell", counting_run_cell)
    plan = make_plan("quick", countermeasures=["none", "mix"], epochs=1)
    baselines = tmp_path / "baselines"

    def verify_folder(name: str, train: str) -> list[dict]:
        trained.clear()
        data = load_verify_data(tmp_path / name, tmp_path / train, tmp_path / "test")
        return verify.run_plan(plan, data, tmp_path / f"{name}-report", baselines=baselines)

    first = verify_folder("a", "train")
    assert sorted(trained) == [("clean", "none"), ("clean-part", "mix"), ("control", "mix"), ("control", "none"),
                               ("protected", "mix"), ("protected", "none")]
    second = verify_folder("b", "train")
    assert sorted(trained) == [("protected", "mix"), ("protected", "none")]
    assert [r["final"] for r in first if r["cell"]["data"] != "protected"] == \
        [r["final"] for r in second if r["cell"]["data"] != "protected"]
    assert len(list((tmp_path / "b-report" / "cells").glob("*.json"))) == 6
    verify_folder("c", "other-train")  # other clean data: nothing shared
    assert len(trained) == 6


def test_verify_resumes_an_interrupted_run_and_restarts_on_other_data(tmp_path: Path) -> None:
    import attacks.verify as verify
    from protect.progress import NullReporter

    _write_folder(tmp_path / "train", _easy_set(6, 0))
    _write_folder(tmp_path / "test", _easy_set(3, 1))
    for name, seed in (("a", 0), ("b", 1)):
        protect_folder("random", tmp_path / "train", tmp_path / name, seed=seed)
    plan = make_plan("quick", countermeasures=["none"], epochs=3)

    class StopInProtectedRun(NullReporter):
        def phase(self, title: str, total: int | None):
            phase = super().phase(title, total)
            if "/ protected /" in title:
                def stop(amount: int = 1) -> None:
                    raise KeyboardInterrupt
                phase.advance = stop
            return phase

    def run(name: str, reporter: NullReporter) -> list[dict]:
        data = load_verify_data(tmp_path / name, tmp_path / "train", tmp_path / "test")
        return verify.run_plan(plan, data, tmp_path / "report", reporter=reporter)

    with pytest.raises(KeyboardInterrupt):
        run("a", StopInProtectedRun())
    partial = list((tmp_path / "report" / "cells").glob("*.partial.json"))
    assert len(partial) == 1 and json.loads(partial[0].read_text())["test_accuracy"], "epoch 1 was not saved"
    # The protected folder changed since: the saved epoch belongs to other data and is not continued.
    other = NullReporter()
    results = run("b", other)
    assert any("from the start" in text for level, text in other.messages if level == "warning"), other.messages
    assert all("resumed" not in r for r in results)
    assert not list((tmp_path / "report" / "cells").glob("*.partial.*"))
    # Back to the first folder: the finished run on "b" is not taken for it, and the interrupted
    # run continues after its saved epoch.
    finished = tmp_path / "report" / "cells" / f"{plan.cells()[-1].key()}.json"
    trained_on_b = json.loads(finished.read_text())["data_fingerprint"]
    with pytest.raises(KeyboardInterrupt):
        run("a", StopInProtectedRun())
    same = NullReporter()
    resumed = [r for r in run("a", same) if r["cell"]["data"] == "protected"]
    assert resumed[0]["resumed"]["epoch"] == 1 and len(resumed[0]["test_accuracy"]) == 3
    assert any("resumed" in text for _, text in same.messages)
    assert any("trained on other data" in text for level, text in same.messages if level == "warning"), same.messages
    assert json.loads(finished.read_text())["data_fingerprint"] not in ("", trained_on_b)
    again = NullReporter()
    run("a", again)
    assert not [text for level, text in again.messages if level == "warning"], "the rewritten run is taken as it is"


def test_report_only_writes_the_card_from_finished_runs_without_training(tmp_path: Path) -> None:
    _write_folder(tmp_path / "train", _easy_set(6, 0))
    _write_folder(tmp_path / "test", _easy_set(3, 1))
    protect_folder("random", tmp_path / "train", tmp_path / "prot")
    runner = CliRunner()
    base = ["verify", str(tmp_path / "prot"), "--clean-train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
            "--epochs", "1", "--out", str(tmp_path / "report")]
    nothing = runner.invoke(app, [*base, "--countermeasures", "none", "--report-only"])
    assert nothing.exit_code == 2 and "no finished training runs" in nothing.output
    assert runner.invoke(app, [*base, "--countermeasures", "none"]).exit_code == 0
    cells = sorted((tmp_path / "report" / "cells").glob("*.json"))
    assert len(cells) == 3 and all(json.loads(c.read_text())["peak_memory_mib"]["rss"] > 0 for c in cells)
    # A run trained by a hungrier process than the reporting one: the card reports that process's peak.
    hungry = json.loads(cells[0].read_text())
    hungry["peak_memory_mib"]["rss"] = 10**7
    # ... and on a machine with another precision: the card says which runs used which.
    hungry["precision"] = "fp32" if hungry["precision"] == "bf16" else "bf16"
    hungry["device"] = "NVIDIA H200 GPU"
    cells[0].write_text(json.dumps(hungry))
    partial = runner.invoke(app, [*base, "--countermeasures", "none,jpeg", "--report-only"])
    assert partial.exit_code == 0, partial.output
    assert len(list((tmp_path / "report" / "cells").glob("*.json"))) == 3
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [row["countermeasure"] for row in report["rows"]] == ["none"]
    assert report["runs"]["planned"] == 6 and report["runs"]["finished"] == 3
    assert report["peak_memory_mib"]["rss"] == 10**7
    card = (tmp_path / "report" / "report.md").read_text()
    assert "only 3 of 6 training runs are finished" in card and "the 3 training runs shown took" in card
    assert "MiB resident" in card
    assert "bf16 autocast for 1 run, float32 for 2 runs" in card or "bf16 autocast for 2 runs, float32 for 1 run" in card
    assert f"trained on {device_description(torch.device('cpu'))} (2 runs), NVIDIA H200 GPU (1 run)." in card


def test_clean_part_baseline_is_the_mix_without_its_protected_images() -> None:
    from attacks.verify import CLEAN_PART, Cell, VerifyData, training_images

    clean = _easy_set(20, seed=0)
    protected = ImageSet(255 - clean.images, clean.labels, clean.classes, [f"{i}.png" for i in range(40)])
    clean.paths = list(protected.paths)
    data = VerifyData(clean, protected, protected, _easy_set(2, seed=1), {}, 8 / 255)
    for per_class in (None, 6):
        def cell(kind: str) -> Cell:
            return Cell("small-cnn", "mix", (("clean_fraction", 0.3),), kind, 1, 2, per_class)

        mixed, part = training_images(cell("protected"), data), training_images(cell(CLEAN_PART), data)
        kept_clean = [path for path, image in zip(mixed.paths, mixed.images)
                      if torch.equal(image, clean.images[int(path[:-4])])]
        assert part.paths == kept_clean and 0 < len(part) < len(mixed)
        assert all(torch.equal(image, clean.images[int(path[:-4])]) for path, image in zip(part.paths, part.images))


def test_card_says_whether_the_protected_part_helped_or_hurt() -> None:
    from attacks.report import _mix_lines, summarise

    def result(data: str, countermeasure: str, final: float, seed: int) -> dict:
        cell = {"victim": "small-cnn", "countermeasure": countermeasure, "data": data, "seed": seed,
                "settings": [["clean_fraction", 0.5]] if countermeasure == "mix" else []}
        return {"cell": cell, "final": final, "peak": final, "test_accuracy": [final], "seconds": 1.0}

    def card(mixed: list[float]) -> tuple[dict, str]:
        results = [result("clean", "none", 0.75, s) for s in range(3)]
        results += [result("clean-part", "mix", a, s) for s, a in enumerate((0.70, 0.71, 0.69))]
        results += [result("protected", "mix", a, s) for s, a in enumerate(mixed)]
        row = [r for r in summarise(results, 0.5) if r["countermeasure"] == "mix"][0]
        return row["mix_effect"], "\n".join(_mix_lines([row]))

    effect, text = card([0.60, 0.62, 0.61])
    assert effect["effect"] == "worse" and "made the victim worse" in text and "| 50% | 70.0 ± 1.0 |" in text
    effect, text = card([0.74, 0.73, 0.74])
    assert effect["effect"] == "better" and "**adding the protected part made the victim better" in text
    assert card([0.70, 0.71, 0.70])[0]["effect"] == "unclear"

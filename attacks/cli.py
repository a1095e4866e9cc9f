"""``protect verify``, added to the ``protect`` command line through the ``protect.commands``
entry point (so that ``protect`` itself never imports ``attacks``)."""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.table import Table

from attacks.contrastive import CONTRASTIVE_VICTIMS
from attacks.purify import PurifierError, default_cache_dir, example_rows, plan_variants
from attacks.purify_cli import register as register_purifier
from attacks.report import example_index, summarise, write_report
from attacks.verify import VerifyError, largest_peak_memory, load_verify_data, make_plan, peak_memory_mib, run_plan
from protect.console import RichReporter, err, fail, out, progress_display, resolve_device


def _split(value: Optional[str]) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _floats(value: str, option: str) -> list[float]:
    try:
        return [float(v) for v in _split(value) or []]
    except ValueError:
        raise fail(f"{option} is a comma list of numbers; got {value!r}") from None


def verify(
    protected: Path = typer.Argument(..., help="Folder written by `protect run` (its manifest pairs files with originals)."),
    clean_train: Path = typer.Option(..., "--clean-train", help="The clean originals (ImageFolder: one subfolder per class)."),
    test: Path = typer.Option(..., "--test", help="Clean test set (ImageFolder), disjoint from the training data."),
    preset: str = typer.Option("quick", "--preset", help="quick (minutes on a CPU) or standard (protocol P0)."),
    victims: Optional[str] = typer.Option(None, "--victims", help="Comma list: small-cnn, resnet18, vgg11, vit-small, "
                                          "resnet18-imagenet (torchvision's, for photos at 112/224 px); clip-tiny, clip-small "
                                          "(contrastive: a CLIP trained on each image's caption)."),
    countermeasures: Optional[str] = typer.Option(
        None, "--countermeasures",
        help="Comma list: none, jpeg, grayscale, bit-depth, blur, cutout, mixup, cutmix, adv-training, ueraser-lite, mix, "
        "diffusion-purify (needs --purifier).",
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs per victim (default: the preset's)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Number of seeds per cell (default: the preset's)."),
    mix: float = typer.Option(0.5, "--mix", help="For the `mix` countermeasure: fraction of the training set that is clean."),
    size: Optional[int] = typer.Option(
        None, "--size", "--resolution", help="Victims train at this square size in pixels (default: from the clean images' "
        "median shorter side: 32 below 64 px, 64 below 112 px, else 112; --size 224 trains at ImageNet's size, 4x the cost). "
        "At 64 px and more victims train with random-resized crops and flips.",
    ),
    report_dir: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: PROTECTED-verify beside it). "
                                              "Finished cells there are reused, and an interrupted training "
                                              "run resumes after its last finished epoch."),
    baselines: Optional[Path] = typer.Option(
        None, "--baselines", help="Folder where clean and control training runs are kept and reused by any verify run "
        "over the same clean train and test sets (e.g. when verifying several methods' outputs of one folder).",
    ),
    report_only: bool = typer.Option(
        False, "--report-only", help="Write the card from the training runs already finished (in --out and --baselines) "
        "and train nothing: a look at a long run while it is under way.",
    ),
    purifier: Optional[Path] = typer.Option(None, "--purifier", help="For diffusion-purify: a local diffusers DDPM "
                                            "checkpoint folder (e.g. from `protect purifier train`)."),
    purify_t: str = typer.Option("0.1,0.2", "--purify-t", help="For diffusion-purify: t* values as fractions of the "
                                 "diffusion horizon T, one row each."),
    purify_steps: int = typer.Option(10, "--purify-steps", help="For diffusion-purify: reverse (denoising) steps from t* to 0."),
    captions: Optional[Path] = typer.Option(
        None, "--captions", help="Contrastive victims: a CSV/JSONL of image,caption for the training images (paths relative "
        "to --clean-train). Default: a caption made from each image's class, colours and brightness.",
    ),
    test_captions: Optional[Path] = typer.Option(
        None, "--test-captions", help="Contrastive victims: a CSV/JSONL of image,caption for the test images (paths relative "
        "to --test), scored by recall@1/5/10 both ways. Default: as for --captions.",
    ),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    relabel: Optional[str] = typer.Option(None, "--relabel", help="Labels the victims train and test with: true (default), "
                                          "coarse:FILE or coarse:NAME (class groups, e.g. coarse:cifar10-coarse) or "
                                          "kmeans[:K] (clusters of the clean images)."),
) -> None:
    """Train victims on clean, random-noise and protected data; write a protection card."""
    torch_device = resolve_device(device)
    report_dir = report_dir or protected.parent / f"{protected.name.rstrip('/')}-verify"
    chosen = _split(countermeasures)
    purifying = "diffusion-purify" in (chosen or [])
    try:
        variants = {"diffusion-purify": plan_variants(purifier, _floats(purify_t, "--purify-t"), purify_steps)} if purifying else {}
        plan = make_plan(preset, victims=_split(victims), countermeasures=chosen,
                         epochs=epochs, seeds=seeds, clean_fraction=mix, relabel=relabel, variants=variants)
        if report_dir.resolve().is_relative_to(protected.resolve()):
            raise VerifyError("--out must not be inside the protected folder")
        data = load_verify_data(protected, clean_train, test, resolution=size, relabel=plan.relabel,
                                captions=captions, test_captions=test_captions)
    except (VerifyError, PurifierError) as exc:
        raise fail(str(exc)) from None
    started = time.perf_counter()
    cells = plan.cells()
    err.print(f"verify: {len(cells)} training runs ({len(data.clean)} train / {len(data.test)} test images)", highlight=False)
    with progress_display() as progress:
        reporter = RichReporter(progress)
        # purified sets are cached by content, so every verify run over the same folders shares them
        resources = {"diffusion-purify": {"purifier": purifier, "cache_dir": default_cache_dir(), "device": torch_device,
                                          "reporter": reporter}}
        try:
            results = run_plan(plan, data, report_dir, device=torch_device, reporter=reporter,
                               baselines=baselines, train=not report_only, resources=resources)
            examples = (example_rows(purifier, data.clean.images[example_index(data)], data.protected.images[example_index(data)],
                                     variants["diffusion-purify"], device=torch_device) if purifying else [])
        except PurifierError as exc:
            raise fail(str(exc)) from None
    if not results:
        raise fail(f"no finished training runs in {report_dir / 'cells'}" + (f" or {baselines}" if baselines else "")
                   + "; run without --report-only to train them")
    rows = summarise(results, data.chance)
    meta = {
        "protected": str(protected), "clean_train": str(clean_train), "test": str(test), "preset": preset,
        "plan": {"victims": plan.victims, "countermeasures": plan.countermeasures, "epochs": plan.epochs,
                 "seeds": plan.seeds, "per_class": plan.per_class},
        "relabel": plan.relabel or "true", "labelling": data.labelling, "size": data.size,
        **({"captions": data.captions_source} if any(v in CONTRASTIVE_VICTIMS for v in plan.victims) else {}),
        "device": str(torch_device), "seconds": time.perf_counter() - started,
        "peak_memory_mib": largest_peak_memory(results, peak_memory_mib(torch_device)),
        "runs": {"planned": len(cells), "finished": len(results),
                 "seconds": sum(r.get("wall_seconds", r["seconds"]) for r in results)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "protect": metadata.version("protect")},
    }
    document = write_report(report_dir, rows, results, data, meta, examples)
    table = Table(title=f"clean test accuracy % ({report_dir / 'report.md'})")
    for column in ("victim", "countermeasure", "clean", "control", "protected", "verdict"):
        table.add_column(column)
    for row in rows:
        values = [f"{100 * row[k]['final']['mean']:.1f}" if row.get(k) else "–" for k in ("clean", "control", "protected")]
        table.add_row(row["victim"], row["countermeasure"], *values, row["verdict"]["text"])
    out.print(table)
    for row in rows:
        if "mix_effect" in row:
            out.print(f"{row['victim']} / mix with {row['settings']['clean_fraction']:.0%} clean: "
                      f"{100 * row['protected']['final']['mean']:.1f}% mixed vs {100 * row['clean-part']['final']['mean']:.1f}% "
                      f"on the clean part alone: {row['mix_effect']['text']}", highlight=False)
    for warning in document["warnings"]:
        out.print(f"[yellow]warning:[/yellow] {warning}", markup=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command(name="verify")(verify)
    register_purifier(app)

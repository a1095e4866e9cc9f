"""The protection card: ``report.json`` (every number) and ``report.md`` (for people), with plots.

Verdict per row (victim x countermeasure): *protected* when the protected-data victim's final
clean test accuracy is within 10 points of chance or below half of the clean baseline;
otherwise *NOT protected*. Peak accuracy over epochs is reported too, since stopping early is
itself a countermeasure. A clean/protected mix is also compared with its clean part alone: the
card says whether adding the protected images made the victim better or worse.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from attacks.countermeasures import label, row_name
from attacks.train import augmentation_for
from attacks.verify import CLEAN_PART, DATA_KINDS, VerifyData

WEAK_BASELINE_MARGIN = 0.20  # clean accuracy must beat chance by this much to mean anything
CHANCE_MARGIN = 0.10


def _pyplot() -> Any:
    """matplotlib, imported only when a report draws its plots (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def summarise(results: list[dict[str, Any]], chance: float) -> list[dict[str, Any]]:
    """One row per (victim, countermeasure): stats per data kind and a verdict against
    ``chance`` (VerifyData.chance)."""
    grouped: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    order: list[tuple[str, str]] = []
    for result in results:
        cell = result["cell"]
        key = (cell["victim"], row_name(cell["countermeasure"], dict(cell["settings"])))
        if key not in grouped:
            order.append(key)
        grouped[key][cell["data"]].append(result)
    plain_clean = {victim: runs["clean"] for (victim, cm), runs in grouped.items() if cm == "none" and runs.get("clean")}
    rows = []
    for victim, countermeasure in order:
        runs = grouped[(victim, countermeasure)]
        settings = dict(runs[next(iter(runs))][0]["cell"]["settings"])
        baseline = "same countermeasure"
        if not runs.get("clean") and plain_clean.get(victim):
            runs["clean"] = plain_clean[victim]  # mixing or not run: compare with the plain clean baseline
            baseline = "plain clean run"
        row: dict[str, Any] = {"victim": victim, "countermeasure": countermeasure, "settings": settings,
                               "clean_baseline": baseline}
        for kind in (*DATA_KINDS, CLEAN_PART):
            if runs.get(kind):
                row[kind] = {
                    "final": _stats([r["final"] for r in runs[kind]]),
                    "peak": _stats([r["peak"] for r in runs[kind]]),
                    "curve": np.mean([r["test_accuracy"] for r in runs[kind]], axis=0).tolist(),
                    "seconds": sum(r["seconds"] for r in runs[kind]),
                }
                if all("recall" in r for r in runs[kind]):  # contrastive victims: mean retrieval recall
                    row[kind]["recall"] = {k: float(np.mean([r["recall"][k] for r in runs[kind]])) for k in runs[kind][0]["recall"]}
        row["verdict"] = _verdict(row, chance)
        if CLEAN_PART in row and "protected" in row:
            row["mix_effect"] = _mix_effect(row)
        rows.append(row)
    return rows


def _verdict(row: dict[str, Any], chance: float) -> dict[str, Any]:
    if "protected" not in row:
        return {"protected": None, "text": "no protected run"}
    final = row["protected"]["final"]["mean"]
    peak = row["protected"]["peak"]["mean"]
    clean = row.get("clean", {}).get("final", {}).get("mean")
    if clean is not None and clean < chance + WEAK_BASELINE_MARGIN:
        return {"protected": None, "peak_protected": None,
                "text": f"inconclusive: clean baseline only {100 * clean:.1f}%"}

    def passes(accuracy: float) -> bool:
        return accuracy <= chance + CHANCE_MARGIN or (clean is not None and accuracy < 0.5 * clean)

    protected = passes(final)
    text = "protected" if protected else "NOT protected"
    if protected and not passes(peak):
        text += f" (but peak accuracy {100 * peak:.1f}% during training: early stopping defeats it)"
    return {"protected": protected, "peak_protected": passes(peak), "text": text}


def _mix_effect(row: dict[str, Any]) -> dict[str, Any]:
    """Whether adding the protected part to the clean part made the victim better or worse
    (mean final accuracy); a difference within the larger seed-to-seed spread is called unclear."""
    mixed, part = row["protected"]["final"], row[CLEAN_PART]["final"]
    change = mixed["mean"] - part["mean"]
    spread = max(mixed["std"], part["std"])
    effect = "unclear" if abs(change) <= spread else "worse" if change < 0 else "better"
    text = {"worse": "adding the protected part made the victim worse than its clean part alone",
            "better": "adding the protected part made the victim better: the protected images still teach it",
            "unclear": "adding the protected part changed the victim by less than the spread over seeds"}[effect]
    return {"effect": effect, "change": change, "text": f"{text} ({100 * change:+.1f} points)"}


def evaluation_warnings(rows: list[dict[str, Any]], data: VerifyData) -> list[str]:
    """Mistakes that make a verification meaningless or misleading."""
    warnings = []
    chance = data.chance
    for row in rows:
        name = f"{row['victim']} / {row['countermeasure']}"
        clean = row.get("clean", {}).get("final", {}).get("mean")
        if clean is not None and clean < chance + WEAK_BASELINE_MARGIN:
            warnings.append(
                f"{name}: the clean baseline reaches only {100 * clean:.1f}% (chance {100 * chance:.0f}%): too weak "
                "for a low protected accuracy to mean anything; train longer or on more data"
            )
        control = row.get("control", {}).get("final", {}).get("mean")
        protected = row.get("protected", {}).get("final", {}).get("mean")
        conclusive = row["verdict"]["protected"] is not None
        if conclusive and control is not None and protected is not None and protected >= control - 0.02:
            warnings.append(
                f"{name}: protected accuracy {100 * protected:.1f}% is not below the random-noise control "
                f"({100 * control:.1f}%): the protection does no better than random noise here"
            )
    overlap = _overlap(data.clean.images, data.test.images)
    if overlap:
        warnings.append(
            f"{overlap} test image(s) also appear in the clean training set: test accuracy is inflated; use disjoint sets"
        )
    levels = round(data.eps * 255)
    copies = _near_copies(data.clean.images, data.test.images, levels + 2) - overlap
    if copies > 0.05 * len(data.test):  # a few natural near-duplicates are common; a copied test set is not
        warnings.append(
            f"{copies} test image(s) are copies of training images within the budget (e.g. a protected copy of the "
            "training set): the test then rewards learning the noise; use a disjoint test set"
        )
    if data.claimed_eps is not None and round(data.claimed_eps * 255) != levels:
        warnings.append(
            f"protection.json claims eps {round(data.claimed_eps * 255)}/255, but the protected images differ from their "
            f"originals by up to {levels}/255: the card and the random control use the measured {levels}/255"
        )
    return warnings


def _overlap(train: torch.Tensor, test: torch.Tensor) -> int:
    seen = {bytes(img.numpy().tobytes()) for img in train}
    return sum(bytes(img.numpy().tobytes()) in seen for img in test)


def _near_copies(train: torch.Tensor, test: torch.Tensor, levels: int, chunk: int = 256) -> int:
    """Test images within ``levels`` (L-inf) of some training image. Averaging over 8 x 8 blocks
    cannot increase an L-inf distance, so block means find the candidates cheaply."""
    def blocks(images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)

    train_blocks, found = blocks(train), 0
    for start in range(0, len(test), chunk):
        part = test[start : start + chunk]
        close = torch.cdist(blocks(part), train_blocks, p=float("inf")) <= levels
        for row, candidates in enumerate(close):
            index = candidates.nonzero().flatten()
            if len(index):
                gap = (train[index].int() - part[row].int()).abs().flatten(1).amax(1)
                found += int((gap <= levels).any())
    return found


def _pct(stats: dict[str, Any] | None, key: str = "final") -> str:
    if not stats:
        return "–"
    s = stats[key]
    return f"{100 * s['mean']:.1f}" + (f" ± {100 * s['std']:.1f}" if s["n"] > 1 else "")


def write_report(
    out_dir: Path, rows: list[dict[str, Any]], results: list[dict[str, Any]], data: VerifyData,
    meta: dict[str, Any], examples: list[tuple[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Write report.json, report.md and the PNG plots; return the JSON document. ``examples``:
    further labelled rows for the example strip (e.g. purified images), uint8 (8, 3, S, S) each,
    taken from the strip's images (:func:`example_index`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    warnings = evaluation_warnings(rows, data)
    runs = meta.get("runs", {})
    if runs.get("finished", 0) < runs.get("planned", 0):
        warnings.insert(0, f"only {runs['finished']} of {runs['planned']} training runs are finished: the table shows "
                           "what has been measured so far (fewer seeds, missing rows); rerun without --report-only to complete it")
    paths = {
        "curves": _plot_curves(out_dir / "curves.png", rows),
        "matrix": _plot_matrix(out_dir / "matrix.png", rows),
        "strip": _plot_strip(out_dir / "examples.png", data, examples or []),
    }
    document = {**meta, "rows": rows, "warnings": warnings, "cells": results, "plots": {k: v.name for k, v in paths.items()}}
    (out_dir / "report.json").write_text(json.dumps(document, indent=2))
    (out_dir / "report.md").write_text(_markdown(rows, results, warnings, data, meta))
    return document


def _markdown(
    rows: list[dict[str, Any]], results: list[dict[str, Any]], warnings: list[str], data: VerifyData, meta: dict[str, Any]
) -> str:
    protection = data.protection
    summary = protection.get("summary", {})
    designed = set(protection.get("designed_against", []))
    chance = 100.0 * data.chance
    lines = [
        "# Protection card",
        "",
        "## What was protected",
        f"- Protected folder: `{meta['protected']}` ({len(data.protected)} images, {len(data.clean.classes)} classes)",
        f"- Method: `{protection.get('method', 'unknown')}`, seed {protection.get('seed', '?')}",
        f"- Budget: L-inf eps = {data.eps * 255:.0f}/255, measured on every pair of files"
        + (f" (protection.json claims {data.claimed_eps * 255:.0f}/255)" if data.claimed_eps is not None else " (no protection.json)")
        + (f"; largest change written: {summary['max_abs_diff_levels']}/255" if "max_abs_diff_levels" in summary else ""),
        f"- Image quality: mean PSNR {summary.get('mean_psnr_db', '–')} dB, mean SSIM {summary.get('mean_ssim', '–')}",
        f"- Clean training set: `{meta['clean_train']}`; test set: `{meta['test']}` ({len(data.test)} images)",
        f"- Labels used by the victims: {meta.get('labelling', 'the clean folders’ class names')}",
        f"- Victims trained at: {_size_text(meta.get('size'))}",
        "",
        "## Clean test accuracy of victims (%)",
        f"Chance (always answering the most frequent test label) is {chance:.1f}%. Control = the same images with uniform random noise of the same budget. "
        "Mean ± standard deviation over seeds; final epoch (peak over epochs in brackets).",
        "",
        "| victim | countermeasure | clean | control | protected | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            f"{_pct(row.get(kind))} ({_pct(row.get(kind), 'peak')})" if row.get(kind) else "–" for kind in DATA_KINDS
        ]
        verdict = row["verdict"]["text"]
        verdict = f"**{verdict}**" if row["verdict"]["protected"] is False else verdict
        star = "*" if row["clean_baseline"] != "same countermeasure" else ""
        star += " ◆" if row["countermeasure"] in designed else ""
        lines.append(f"| {row['victim']} | {label(row['countermeasure'], row['settings'])}{star} | " + " | ".join(cells) + f" | {verdict} |")
    recall_rows = [row for row in rows if any("recall" in (row.get(kind) or {}) for kind in DATA_KINDS)]
    if recall_rows:
        distinct = max((r.get("distinct_test_captions", 0) for r in results), default=0)
        lines += ["", "Contrastive victims (clip-*) report zero-shot accuracy above; their retrieval recall on the clean "
                  f"test pairs, each image with its own caption ({meta.get('captions', 'attributes')}; {distinct} distinct "
                  "test captions) (%, image->text R@1/5/10, text->image R@1/5/10):", ""]
        for row in recall_rows:
            for kind in DATA_KINDS:
                recall = (row.get(kind) or {}).get("recall")
                if recall:
                    shown = " ".join(f"{100 * recall[f'{d}_r{k}']:.1f}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))
                    lines.append(f"- {row['victim']} / {row['countermeasure']} / {kind}: {shown}")
    lines += ["", "A row is *protected* when the protected-data victim ends within 10 points of chance or below half "
              "the clean baseline. Rows marked * compare with the plain clean run (no countermeasure)."
              + (" Rows marked ◆ are countermeasures the method was built to resist." if designed else ""), ""]
    lines += _mix_lines(rows)
    if any(row["countermeasure"].startswith("diffusion-purify") for row in rows):
        lines += ["In diffusion-purify rows every training set (clean, control, protected) was purified with a "
                  "diffusion model at t* before training: the clean column is what purification costs by itself. "
                  "Purified examples are in the example strip below.", ""]
    if warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    lines += [
        "## Plots",
        "",
        "![test accuracy per epoch](curves.png)",
        "",
        "![accuracy matrix](matrix.png)",
        "",
        "![original, protected, noise x10](examples.png)",
        "",
        "## How this was measured",
        f"- Preset `{meta['preset']}`; victims trained at {data.clean.images.shape[-1]} px with SGD (Nesterov), "
        f"one-cycle learning rate, random crop + flip; {_precision_text(results)}; trained on {_device_text(results)}.",
        _cost_line(meta),
        "",
    ]
    return "\n".join(lines)


def _mix_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The mixing table: each mix next to its clean part alone and the all-clean run."""
    mixes = [row for row in rows if "mix_effect" in row]
    if not mixes:
        return []
    lines = ["## Mixed with clean data", "",
             "The victim trains on a clean fraction of the images plus the protected copies of the rest (mixed), "
             "on that clean fraction alone (clean part only), and on all images clean. Protected data that helps "
             "the victim (mixed above clean part only) still gives a scraper value.", "",
             "| victim | clean fraction | clean part only | mixed: control | mixed: protected | all clean | effect of the protected part |",
             "|---|---|---|---|---|---|---|"]
    for row in mixes:
        cells = [_pct(row.get(kind)) for kind in (CLEAN_PART, "control", "protected", "clean")]
        effect = row["mix_effect"]
        text = f"**{effect['text']}**" if effect["effect"] == "better" else effect["text"]
        lines.append(f"| {row['victim']} | {row['settings'].get('clean_fraction', 0.5):.0%} | " + " | ".join(cells) + f" | {text} |")
    return lines + [""]


def _size_text(size: dict[str, Any] | None) -> str:
    if not size:
        return "unrecorded"
    return f"{size['value']} x {size['value']} px ({size['how']}), training augmentation {augmentation_for(size['value'])}"


def _precision_text(results: list[dict[str, Any]]) -> str:
    """How the runs shown computed; runs finished on different machines may differ."""
    return _count_runs([r.get("precision") for r in results], _precision_name, "{what} for {runs}")


def _device_text(results: list[dict[str, Any]]) -> str:
    return _count_runs([r.get("device", "a device not recorded") for r in results], str, "{what} ({runs})")


def _count_runs(values: list[Any], describe: Callable[[Any], str], template: str) -> str:
    """``describe(value)`` when all runs share one value; otherwise each value with its number
    of runs, filled into ``template``."""
    counts = Counter(values)
    if len(counts) == 1:
        return describe(next(iter(counts)))
    return ", ".join(template.format(what=describe(value), runs=f"{n} run{'s' * (n != 1)}")
                     for value, n in sorted(counts.items(), key=lambda vn: str(vn[0])))


def _precision_name(precision: str | None) -> str:
    """A run's recorded precision in words: "bf16", "fp32", or several joined by "+" for a run
    resumed on a machine that computes in another precision."""
    if precision is None:
        return "precision not recorded"
    names = {"bf16": "bf16 autocast", "fp32": "float32", "unrecorded": "unrecorded precision"}
    parts = [names.get(part, part) for part in precision.split("+")]
    if len(parts) == 1:
        return parts[0]
    return f"epochs in {' and '.join(parts)} (resumed on another machine)"


def _cost_line(meta: dict[str, Any]) -> str:
    parts = [f"- Wall time: {meta['seconds']:.0f} s on {meta['device']} for this run"]
    if "runs" in meta:
        parts.append(f"the {meta['runs']['finished']} training runs shown took {meta['runs']['seconds']:.0f} s in all")
    memory = meta.get("peak_memory_mib")
    if memory:
        parts.append(f"peak memory {memory['rss']:.0f} MiB resident, the largest over the training processes"
                     + (f", {memory['cuda']:.0f} MiB on the GPU" if "cuda" in memory else ""))
    parts.append("package versions in report.json.")
    return "; ".join(parts)


COLOURS = {"clean": "#2b8a3e", "control": "#868e96", "protected": "#c92a2a"}


def _plot_curves(path: Path, rows: list[dict[str, Any]]) -> Path:
    plt = _pyplot()
    n = len(rows)
    cols = min(n, 4)
    rows_n = -(-n // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False, sharey=True)
    for ax, row in zip(axes.flat, rows):
        for kind in DATA_KINDS:
            if row.get(kind):
                curve = 100 * np.array(row[kind]["curve"])
                ax.plot(range(1, len(curve) + 1), curve, color=COLOURS[kind], label=kind)
        ax.set_title(f"{row['victim']} / {row['countermeasure']}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].set_ylabel("clean test acc %")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_matrix(path: Path, rows: list[dict[str, Any]]) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows)), 3.2))
    x = np.arange(len(rows))
    width = 0.27
    for i, kind in enumerate(DATA_KINDS):
        values = [100 * row[kind]["final"]["mean"] if row.get(kind) else 0 for row in rows]
        errors = [100 * row[kind]["final"]["std"] if row.get(kind) else 0 for row in rows]
        ax.bar(x + (i - 1) * width, values, width, yerr=errors, color=COLOURS[kind], label=kind)
    ax.set_xticks(x, [f"{r['victim']}\n{r['countermeasure']}" for r in rows], fontsize=7)
    ax.set_ylabel("clean test acc %")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def example_index(data: VerifyData, count: int = 8) -> torch.Tensor:
    """The training images the example strip shows: ``count`` spread over the set."""
    return torch.linspace(0, len(data.clean) - 1, min(count, len(data.clean))).long()


def _plot_strip(path: Path, data: VerifyData, extra: list[tuple[str, torch.Tensor]]) -> Path:
    plt = _pyplot()
    index = example_index(data)
    count = len(index)
    clean = data.clean.images[index].float()
    protected = data.protected.images[index].float()
    noise = ((protected - clean) * 10 + 127.5).clamp(0, 255)
    shown = [(clean, "original"), (protected, "protected"), (noise, "noise x10")] + [(img.float(), label) for label, img in extra]
    fig, axes = plt.subplots(len(shown), count, figsize=(1.3 * count, 1.4 * len(shown)), squeeze=False)
    for j in range(count):
        for i, (img, label) in enumerate(shown):
            axes[i, j].imshow(img[j].permute(1, 2, 0).byte().numpy(), interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if j == 0:
                axes[i, j].set_ylabel(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

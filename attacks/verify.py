"""``protect verify``: train victims on clean, random-control and protected data and compare.

A verification run is data: a list of :class:`Cell` specs (victim, countermeasure and its
settings, training data, epochs, seed). Presets expand to such lists. Each finished cell is
saved under ``REPORT_DIR/cells/`` so an interrupted run picks up where it stopped, and a
classifier cell keeps its state after each epoch there until it finishes; with a baselines
folder, clean and control cells are also shared between runs over the same clean data.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from attacks.contrastive import (
    CONTRASTIVE_VICTIMS,
    ClipTrainConfig,
    HeldOutPairs,
    attribute_captions,
    captions_from_file,
    contrastive_cell,
)
from attacks.countermeasures import COUNTERMEASURES, build_countermeasure
from attacks.data import ImageSet, clean_choice, load_image_folder, load_pairs, mix_with_clean, victim_size
from attacks.purify import missing_purifier_message
from attacks.relabel import RelabelError, describe, parse_spec, relabel_sets
from attacks.train import VICTIM_LR, TrainConfig, augmentation_for, train_classifier
from protect.budget import perturb_uint8
from protect.generator import Batch, MethodConfig, bounded_perturbation, create_generator
from protect.hardware import device_description
from protect.images import write_text_atomic
from protect.models import CLASSIFIERS, build_classifier
from protect.precision import resolved_precision
from protect.progress import NullReporter, Reporter
from protect.training_state import CheckpointError, remove_training_state, tensor_fingerprint

DATA_KINDS = ("clean", "control", "protected")
# A mix's own baseline: only the clean images of the mix, without its protected part. Mixed runs
# below it mean the protected images made the victim worse than not having them at all.
CLEAN_PART = "clean-part"


class VerifyError(ValueError):
    """The folders given to verify cannot be compared; the message says which and why."""


@dataclass(frozen=True)
class Cell:
    """One victim training run."""

    victim: str
    countermeasure: str
    settings: tuple[tuple[str, Any], ...]
    data: str
    epochs: int
    seed: int
    per_class: int | None = None
    relabel: str | None = None

    def key(self) -> str:
        fields = asdict(self)
        if fields["relabel"] is None:
            del fields["relabel"]  # cells of runs with the true labels keep their earlier keys
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Plan:
    """Victims x countermeasures x data kinds x seeds; ``per_class`` caps the training set
    per victim (the P0 ResNet-18 transfer check uses 500 images per class)."""

    victims: list[str]
    countermeasures: list[tuple[str, dict[str, Any]]]
    epochs: dict[str, int]
    seeds: dict[str, int]
    per_class: dict[str, int | None] = field(default_factory=dict)
    # Countermeasures trained on the protected data only; their rows compare with the plain
    # clean baseline (used by `quick` for adversarial training, which costs 6 plain runs).
    protected_only: tuple[str, ...] = ()
    # The victims' labelling (attacks.relabel); None: the true labels.
    relabel: str | None = None

    def cells(self) -> list[Cell]:
        cells = []
        for victim in self.victims:
            for name, settings in self.countermeasures:
                # a clean set mixed with clean data is the plain clean baseline; a mix is also
                # compared with its clean part alone
                for data in (CLEAN_PART, "control", "protected") if name == "mix" else DATA_KINDS:
                    if name in self.protected_only and data != "protected":
                        continue
                    for seed in range(self.seeds[victim]):
                        cells.append(Cell(victim, name, tuple(sorted(settings.items())), data,
                                          self.epochs[victim], seed, self.per_class.get(victim), self.relabel))
        return cells


# PROTOCOL.md's P0 list; bit-depth reduction, blur and diffusion purification (which needs a
# purifier checkpoint) are there on request (--countermeasures).
P0_COUNTERMEASURES = [(name, {"clean_fraction": 0.5} if name == "mix" else {})
                      for name in COUNTERMEASURES if name not in ("bit-depth", "blur", "diffusion-purify")]

PRESETS: dict[str, Plan] = {
    # Finishes on protocol P0 on 2 CPU cores in under 15 minutes.
    "quick": Plan(
        victims=["small-cnn"],
        countermeasures=[("none", {}), ("jpeg", {}), ("grayscale", {}), ("adv-training", {}), ("mix", {"clean_fraction": 0.5})],
        epochs={"small-cnn": 8},
        seeds={"small-cnn": 1},
        protected_only=("adv-training",),
    ),
    # Protocol P0 as written in PROTOCOL.md.
    "standard": Plan(
        victims=["small-cnn", "resnet18"],
        countermeasures=P0_COUNTERMEASURES,
        epochs={"small-cnn": 15, "resnet18": 8},
        seeds={"small-cnn": 3, "resnet18": 1},
        per_class={"resnet18": 500},
    ),
}


def make_plan(
    preset: str,
    *,
    victims: list[str] | None = None,
    countermeasures: list[str] | None = None,
    epochs: int | None = None,
    seeds: int | None = None,
    clean_fraction: float = 0.5,
    relabel: str | None = None,
    variants: dict[str, list[dict[str, Any]]] | None = None,
) -> Plan:
    """A preset, with any of its lists or numbers replaced; ``relabel`` as in attacks.relabel.
    ``variants``: for a countermeasure run at several settings, one settings dict per row
    (``diffusion-purify`` needs them: its purifier and t* values, see attacks.purify)."""
    variants = variants or {}
    if preset not in PRESETS:
        raise VerifyError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    base = PRESETS[preset]
    chosen_victims = victims or base.victims
    for victim in chosen_victims:
        if victim not in CLASSIFIERS and victim not in CONTRASTIVE_VICTIMS:
            raise VerifyError(f"unknown victim {victim!r}; available: {', '.join([*CLASSIFIERS, *CONTRASTIVE_VICTIMS])}")
    if countermeasures is not None:
        chosen = []
        for name in countermeasures:
            if name not in COUNTERMEASURES:
                raise VerifyError(f"unknown countermeasure {name!r}; available: {', '.join(COUNTERMEASURES)}")
            if name == "diffusion-purify" and not variants.get(name):
                raise VerifyError(missing_purifier_message(None))
            for settings in variants.get(name, [{"clean_fraction": clean_fraction} if name == "mix" else {}]):
                chosen.append((name, settings))
    else:
        chosen = [(n, {"clean_fraction": clean_fraction} if n == "mix" else s) for n, s in base.countermeasures]
    if not 0 < clean_fraction < 1:
        raise VerifyError(f"--mix is the clean fraction, strictly between 0 and 1; got {clean_fraction}")

    def per_victim(values: dict[str, Any], override: Any, default: Any) -> dict[str, Any]:
        return {v: override if override is not None else values.get(v, default) for v in chosen_victims}

    return Plan(
        victims=list(chosen_victims),
        countermeasures=chosen,
        epochs=per_victim(base.epochs, epochs, max(base.epochs.values())),
        seeds=per_victim(base.seeds, seeds, 1),
        per_class={v: base.per_class.get(v) for v in chosen_victims},
        protected_only=base.protected_only,
        relabel=_checked_relabel(relabel),
    )


def _checked_relabel(spec: str | None) -> str | None:
    try:
        checked = parse_spec(spec)
    except RelabelError as exc:
        raise VerifyError(str(exc)) from None
    return None if checked == "true" else checked


@dataclass
class VerifyData:
    """Aligned training sets (same images, labels and order) plus the clean test set."""

    clean: ImageSet
    control: ImageSet
    protected: ImageSet
    test: ImageSet
    protection: dict[str, Any]
    eps: float  # measured on the files: the largest |protected - clean| over all pairs
    labelling: str = "the true labels (the clean folders' class names)"
    claimed_eps: float | None = None  # what protection.json says, when there is one
    # Contrastive victims: each training image's caption by path, the held-out captions, and
    # where they came from; None: attribute captions of the clean images (attribute_captions).
    train_captions: dict[str, str] | None = None
    test_captions: list[str] | None = None
    captions_source: str = "attributes"
    #: the size victims train at, and how it was chosen
    size: dict[str, Any] = field(default_factory=dict)

    def contrastive_pairs(self) -> tuple[dict[str, str], HeldOutPairs]:
        """Per-image captions of the training images (by path, from the clean images) and the
        clean held-out pairs contrastive victims are scored on."""
        if self.train_captions is None:
            self.train_captions = dict(zip(self.clean.paths, attribute_captions(self.clean.images, self.clean.labels, self.clean.classes)))
        if self.test_captions is None:
            self.test_captions = attribute_captions(self.test.images, self.test.labels, self.test.classes)
        return self.train_captions, HeldOutPairs(self.test.images, self.test_captions, self.test.labels, self.test.classes)

    def captions_fingerprint(self) -> str:
        train, test = self.contrastive_pairs()
        return hashlib.sha256(json.dumps([sorted(train.items()), test.captions]).encode()).hexdigest()[:16]

    @property
    def chance(self) -> float:
        """Test accuracy of always answering the most frequent test label: 1/classes on a
        balanced test set, more on an unbalanced one or under a coarse relabelling."""
        return torch.bincount(self.test.labels).max().item() / len(self.test)

    def training_set(self, data: str) -> ImageSet:
        return {"clean": self.clean, "control": self.control, "protected": self.protected}[data]


def random_control(clean: ImageSet, eps: float, seed: int) -> ImageSet:
    """The clean set with the ``random`` method's noise at the same budget (8-bit rounded),
    whatever that budget is (a measured one may be larger than ``protect`` itself allows)."""
    config = MethodConfig(eps=eps, resolution=clean.images.shape[-1])
    generator = create_generator("random", config, seed=seed)
    generator.fit(clean.images, None)
    batch = Batch(images=clean.images.float().div(255), labels=None, indices=torch.arange(len(clean)))
    delta = bounded_perturbation(generator, batch)
    return ImageSet(perturb_uint8(clean.images, delta, eps), clean.labels, clean.classes, clean.paths)


def load_verify_data(
    protected_dir: Path, clean_dir: Path, test_dir: Path, *, resolution: int | None = 32, seed: int = 0,
    relabel: str | None = None, captions: Path | None = None, test_captions: Path | None = None,
) -> VerifyData:
    """Pair protected files with their clean originals (by the manifest of ``protect run``,
    else by relative path), read the test set at ``resolution`` px (None: chosen from the clean
    images' size, :func:`attacks.data.victim_size`) and build the random control; ``relabel``
    (attacks.relabel) gives every set the labels a victim would use instead of the true ones.
    ``captions`` / ``test_captions``: CSV/JSONL files of image,caption for contrastive victims
    (paths relative to ``clean_dir`` / ``test_dir``); without them, attribute captions."""
    for label, path in (("protected", protected_dir), ("--clean-train", clean_dir), ("--test", test_dir)):
        if not Path(path).is_dir():
            raise VerifyError(f"{label} folder not found: {path}")
    size_choice = {"value": resolution, "how": "set with --size"}
    try:
        if resolution is None:
            resolution, side = victim_size(clean_dir)
            size_choice = {"value": resolution, "how": f"automatic: the clean images' median shorter side is {side} px"}
        clean, protected = load_pairs(protected_dir, clean_dir, size=resolution)
        if len(clean.classes) < 2:
            raise VerifyError(f"{clean_dir}: training data has only one class ({clean.classes[0]}); need two or more")
        test = load_image_folder(test_dir, size=resolution, classes=clean.classes)
    except VerifyError:
        raise
    except ValueError as exc:
        raise VerifyError(str(exc)) from None
    protection, claimed = _claimed_protection(Path(protected_dir) / "protection.json")
    if not protected.linf_levels:
        raise VerifyError(f"{protected_dir}: every image is identical to its clean original: nothing is protected")
    eps = protected.linf_levels / 255  # what the files hold, not what protection.json says
    spec = _checked_relabel(relabel) or "true"
    try:
        (clean, control, protected), test = relabel_sets(spec, [clean, random_control(clean, eps, seed), protected], test, seed=seed)
    except RelabelError as exc:
        raise VerifyError(str(exc)) from None
    data = VerifyData(clean, control, protected, test, protection, eps, describe(spec), claimed, size=size_choice)
    try:
        if captions is not None:
            data.train_captions = dict(zip(clean.paths, captions_from_file(captions, clean.paths)))
        if test_captions is not None:
            data.test_captions = captions_from_file(test_captions, test.paths)
    except (ValueError, OSError) as exc:
        raise VerifyError(str(exc)) from None
    given = [Path(f).name for f in (captions, test_captions) if f is not None]
    data.captions_source = " + ".join(given + (["attributes"] if len(given) < 2 else []))
    return data


def _claimed_protection(path: Path) -> tuple[dict[str, Any], float | None]:
    """protection.json and the eps it claims (nothing when it is missing or unreadable)."""
    try:
        protection = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        claimed = protection.get("config", {}).get("eps")
        return protection, float(claimed) if isinstance(claimed, (int, float)) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return {}, None


def _kept_positions(labels: torch.Tensor, per_class: int | None) -> torch.Tensor:
    """The positions of the first ``per_class`` images of each class (all of them for None)."""
    if per_class is None:
        return torch.arange(len(labels))
    keep, counts = [], {}
    for i, label in enumerate(labels.tolist()):
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def training_images(cell: Cell, data: VerifyData) -> ImageSet:
    """The set ``cell`` trains on: its data kind, mixed with clean data for ``mix`` (or, for
    the clean-part baseline, only the images the mix keeps clean), capped per class."""
    settings = dict(cell.settings)
    if cell.data == CLEAN_PART:
        keep = _kept_positions(data.clean.labels, cell.per_class)
        chosen = torch.zeros(len(data.clean), dtype=torch.bool)
        chosen[clean_choice(len(data.clean), settings["clean_fraction"], cell.seed)] = True
        return data.clean.take(keep[chosen[keep]])
    train = data.training_set(cell.data)
    if cell.countermeasure == "mix":
        train = mix_with_clean(train, data.clean, settings["clean_fraction"], cell.seed)
    return train.take(_kept_positions(train.labels, cell.per_class))


def victim_train_config(victim: str, epochs: int, n_train: int, size: int = 32) -> TrainConfig:
    """P0's batch of 512 for full-size sets; on small sets a batch of about 1/20 of the data (at
    least 32), so each epoch still takes ~20 steps, with the learning rate scaled by the square
    root of the batch ratio. Victims at photo sizes (64 px and more) train with random-resized
    crops and flips (protocol P2), thumbnails with padded crops and flips (P0)."""
    batch = min(512, max(32, n_train // 20))
    return TrainConfig(epochs=epochs, batch_size=batch, lr=VICTIM_LR[victim] * (batch / 512) ** 0.5,
                       augment=augmentation_for(size))


def run_cell(
    cell: Cell, data: VerifyData, *, device: torch.device, reporter: Reporter, checkpoint: Path | None = None,
    resources: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train one victim as ``cell`` says and return its measured numbers. A classifier's state
    after each epoch goes to ``checkpoint`` (a path stem), and an interrupted run resumes there.
    ``resources``: further keyword arguments per countermeasure that are not part of a cell
    (where its files are: the purifier folder, the cache of purified images)."""
    settings = dict(cell.settings)
    train = training_images(cell, data)
    countermeasure = build_countermeasure(cell.countermeasure, **settings, **(resources or {}).get(cell.countermeasure, {}))
    if cell.victim in CONTRASTIVE_VICTIMS:
        return _run_contrastive_cell(cell, train, data, countermeasure, device=device, reporter=reporter)
    size = data.clean.images.shape[-1]
    model = build_classifier(cell.victim, len(data.clean.classes), seed=cell.seed, image_size=size)
    config = victim_train_config(cell.victim, cell.epochs, len(train), size)
    title = f"{cell.victim} / {cell.countermeasure} / {cell.data} / seed {cell.seed}"
    with reporter.phase(title, total=cell.epochs) as phase:
        def on_epoch(epoch: int, accuracy: float) -> None:
            phase.describe(f"{title}: test acc {100 * accuracy:.1f}%")
            phase.advance()

        result = train_classifier(
            model, train, data.test, config, device=device, seed=cell.seed,
            data_transform=countermeasure.data_transform, batch_loss=countermeasure.batch_loss, on_epoch=on_epoch,
            checkpoint=checkpoint,
        )
    measured = {
        "cell": asdict(cell),
        "test_accuracy": result.test_accuracy,
        "final": result.final,
        "peak": result.peak,
        "seconds": result.seconds,
        "train_images": len(train),
        "size": size,
        "augment": config.augment,
        # a run resumed on a machine that resolves ``auto`` differently trained in both
        "precision": "+".join(sorted(set(result.precision))),
    }
    if result.resumed_from_epoch:
        measured["resumed"] = {"epoch": result.resumed_from_epoch, "seconds": result.resumed_seconds}
    return measured


def _run_cell_resuming(
    cell: Cell, data: VerifyData, checkpoint: Path, *, device: torch.device, reporter: Reporter,
    resources: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """:func:`run_cell`, continuing from the cell's epoch checkpoint when there is one. A
    checkpoint left by other data under the same cell (the protected folder was regenerated)
    is only a cache: it is dropped with a warning and the run starts over."""
    try:
        result = run_cell(cell, data, device=device, reporter=reporter, checkpoint=checkpoint, resources=resources)
    except CheckpointError:
        reporter.message(f"{checkpoint.name}: the saved epochs were trained on other data or settings; "
                         f"training {cell.victim} / {cell.countermeasure} / {cell.data} from the start", "warning")
        remove_training_state(checkpoint)
        result = run_cell(cell, data, device=device, reporter=reporter, checkpoint=checkpoint, resources=resources)
    if "resumed" in result:
        reporter.message(f"resumed {cell.victim} / {cell.countermeasure} / {cell.data} / seed {cell.seed} "
                         f"after epoch {result['resumed']['epoch']}")
    return result


def _run_contrastive_cell(
    cell: Cell, train: ImageSet, data: VerifyData, countermeasure: Any, *, device: torch.device, reporter: Reporter
) -> dict[str, Any]:
    """A small CLIP trained from scratch on (image, its own caption) pairs; its accuracy is
    zero-shot accuracy on the clean test set, with retrieval recall on the clean held-out pairs
    beside it."""
    if countermeasure.batch_loss is not None:
        raise VerifyError(f"{cell.countermeasure} changes the classification loss; contrastive victims take "
                          "data countermeasures only (none, jpeg, grayscale, bit-depth, blur, mix)")
    captions, held_out = data.contrastive_pairs()
    title = f"{cell.victim} / {cell.countermeasure} / {cell.data} / seed {cell.seed}"
    with reporter.phase(title, total=cell.epochs) as phase:
        def on_epoch(epoch: int, loss: float, scores: dict[str, float]) -> None:
            phase.describe(f"{title}: zero-shot acc {100 * scores['zero_shot']:.1f}%")
            phase.advance()

        result = contrastive_cell(
            cell.victim, train.images, [captions[path] for path in train.paths], held_out, epochs=cell.epochs,
            seed=cell.seed, data_transform=countermeasure.data_transform, device=device, on_epoch=on_epoch,
        )
    return {"cell": asdict(cell), **result, "train_images": len(train), "captions": data.captions_source,
            "precision": resolved_precision(device, ClipTrainConfig.precision)}


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process so far and, on a GPU, the peak allocated there
    since the statistics were last reset."""
    peak = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB
    if device.type == "cuda":
        peak["cuda"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def largest_peak_memory(results: list[dict[str, Any]], current: dict[str, float]) -> dict[str, float]:
    """The largest peak over the processes that trained ``results`` (runs finished before this
    invocation, possibly in other processes, carry their own) and the ``current`` process."""
    peak = dict(current)
    for result in results:
        for kind, mib in result.get("peak_memory_mib", {}).items():
            peak[kind] = max(peak.get(kind, 0.0), mib)
    return peak


def baseline_fingerprint(data: VerifyData) -> str:
    """Identifies what clean and control cells train and test on (the clean, control and test
    images with the labels victims see), so runs over different protected versions of the same
    clean data can share those cells."""
    return _sets_fingerprint(data.clean, data.control, data.test)


def training_fingerprint(data: VerifyData, kind: str) -> str:
    """Identifies everything a run on ``kind`` ("clean", "control" or "protected") trains and
    tests on: that set, the clean set a mix draws from, and the test set."""
    return _sets_fingerprint(data.training_set(kind), data.clean, data.test)


def _sets_fingerprint(*sets: ImageSet) -> str:
    return tensor_fingerprint(*(t for part in sets for t in (part.images, part.labels)))


def _finished_run(
    places: list[Path], fingerprint: str, reporter: Reporter, title: str
) -> tuple[dict[str, Any] | None, list[Path]]:
    """The first result among ``places`` trained on the data ``fingerprint`` names, and the
    places holding a result from other data (the protected folder was made again, or other
    clean data went into the same report folder), which is not used. Results written before
    runs recorded their data carry no fingerprint and are taken as they are."""
    found, stale = None, []
    for path in (place for place in places if place.exists()):
        result = json.loads(path.read_text())
        if result.get("data_fingerprint", fingerprint) != fingerprint:
            stale.append(path)
            reporter.message(f"{path}: {title} was trained on other data than the folders given now, "
                             "so it is not used", "warning")
        elif found is None:
            found = result
            origin = "" if path == places[0] else " (shared baseline)"
            reporter.message(f"already done{origin}: {title}")
    return found, stale


def run_plan(
    plan: Plan, data: VerifyData, out_dir: Path, *, device: torch.device | str = "cpu", reporter: Reporter | None = None,
    baselines: Path | None = None, train: bool = True, resources: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run every cell of ``plan`` not already finished in ``out_dir/cells`` (or, for clean and
    control cells, in ``baselines``); return all results. Finished cells are written to both.
    With ``train=False`` unfinished cells are left out instead of trained; ``resources`` as in
    :func:`run_cell`."""
    reporter = reporter or NullReporter()
    device = torch.device(device)
    cells_dir = Path(out_dir) / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    shared_dir = Path(baselines) / baseline_fingerprint(data) if baselines is not None else None
    if shared_dir is not None:
        shared_dir.mkdir(parents=True, exist_ok=True)
    fingerprints = {kind: training_fingerprint(data, kind) for kind in DATA_KINDS}
    fingerprints[CLEAN_PART] = fingerprints["clean"]
    results = []
    for cell in plan.cells():
        name = f"{cell.key()}.json"
        checkpoint = cells_dir / f"{cell.key()}.partial"
        places = [cells_dir / name]
        if shared_dir is not None and cell.data != "protected":
            places.append(shared_dir / name)
        title = f"{cell.victim} / {cell.countermeasure} / {cell.data} / seed {cell.seed}"
        fingerprint = fingerprints[cell.data]
        if cell.victim in CONTRASTIVE_VICTIMS:  # their captions are part of what they train on
            fingerprint = hashlib.sha256(f"{fingerprint}:{data.captions_fingerprint()}".encode()).hexdigest()[:16]
        result, stale = _finished_run(places, fingerprint, reporter, title)
        if result is None and not train:
            continue
        if result is None:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            result = _run_cell_resuming(cell, data, checkpoint, device=device, reporter=reporter, resources=resources)
            result["wall_seconds"] = time.perf_counter() - started + result.get("resumed", {}).get("seconds", 0.0)
            result["peak_memory_mib"] = peak_memory_mib(device)
            result["device"] = device_description(device)
            result["data_fingerprint"] = fingerprint
        for path in places:
            if path in stale or not path.exists():
                write_text_atomic(path, json.dumps(result))
        remove_training_state(checkpoint)
        results.append(result)
    return results

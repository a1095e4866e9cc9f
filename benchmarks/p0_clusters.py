"""Protocol P0 for the label-agnostic method: `clusters` with three surrogates (a supervised small
CNN, a self-supervised SimCLR encoder, a randomly initialised CLIP) at eps 8/255 and 16/255,
against `em-classwise` fitted on pseudo-labels of the same self-supervised surrogate; small-CNN
victims trained with the true labels, a coarse relabelling (animals vs vehicles,
configs/relabel/cifar10-coarse.yaml) and k-means relabelling (`protect verify --relabel
kmeans:10`).

Every surrogate is trained on CIFAR-10 train images 1000-4999 of each class (sorted by name),
disjoint from the protected subset (images 0-999); the SimCLR encoder never reads their labels.
Each step stores what it measured in ``WORK/results-clusters.json`` and is skipped when rerun,
so a long benchmark can be run a step at a time:

    python benchmarks/p0_clusters.py ssl                              # train the SimCLR surrogate, k-NN accuracy
    python benchmarks/p0_clusters.py ssl-long --ssl-epochs 60         # a longer one, probed every 5 epochs (surrogate ssl-e60)
    python benchmarks/p0_clusters.py fit ssl 16/255 --cluster-epochs 10
    python benchmarks/p0_clusters.py em-pseudo ssl 16/255             # em-classwise on the SSL clusters
    python benchmarks/p0_clusters.py fit ssl 16/255 --k 30            # 30 clusters instead of 10 (row clusters-ssl-16-k30)
    python benchmarks/p0_clusters.py victims clean,clusters-ssl-16 --labels true,coarse,kmeans --seeds 3
    python benchmarks/p0_clusters.py table                            # print and store the table
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from attacks.data import ImageSet, load_image_folder, load_pairs
from attacks.relabel import relabel_sets
from attacks.train import TrainConfig, train_classifier
from attacks.verify import victim_train_config
from protect.models import build_classifier
from protect.cluster import cluster_quality, kmeans
from protect.generator import create_generator, resolve_config
from protect.models.ssl import SSLEncoder, build_encoder, encode, knn_accuracy, load_encoder, train_config, train_encoder
from protect.progress import NullReporter
from protect.surrogate_cli import read_unlabelled

sys.path.insert(0, str(Path(__file__).resolve().parent))
from p0 import build_subset  # noqa: E402
from tables import machine, print_markdown_table, write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COARSE = ROOT / "configs" / "relabel" / "cifar10-coarse.yaml"
LABELLINGS = {"true": "true", "coarse": f"coarse:{COARSE}", "kmeans": "kmeans:10"}
SURROGATE_OFFSET, SURROGATE_PER_CLASS = 1000, 4000


class Bench:
    """Paths, data and the stored results of one P0 work folder."""

    def __init__(self, shared: Path, work: Path) -> None:
        self.cifar = shared / "data" / "cifar10"
        if not self.cifar.is_dir():
            sys.exit(f"{self.cifar} not found: P0 needs the shared CIFAR-10 folder")
        self.work = work
        self.subset = build_subset(self.cifar / "train", work / "train-subset", 1000)
        self.results_path = work / "results-clusters.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}

    def save(self) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        tmp.replace(self.results_path)

    def surrogate_images(self) -> Path:
        return build_subset(self.cifar / "train", self.work / "surrogate-train", SURROGATE_PER_CLASS, offset=SURROGATE_OFFSET)

    def test(self) -> ImageSet:
        return load_image_folder(self.cifar / "test", per_class=200)


def run_measured(cmd: list[str]) -> dict:
    """Run a command in a child process; its wall time and peak RSS (MiB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr_lines = []
    for line in proc.stderr:  # progress lines, passed on so a log shows how far it got
        print(line, end="", file=sys.stderr, flush=True)
        stderr_lines.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(stderr_lines[-30:])}")
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def protect_cli(*args: str) -> list[str]:
    """A ``protect`` command line; the P0 folders are links into the shared data, outside them,
    so every ``run`` here also passes ``--allow-outside``."""
    return [sys.executable, "-m", "protect.cli", *args]


# surrogates ---------------------------------------------------------------------------------


def train_ssl(bench: Bench, epochs: int | None) -> dict:
    """The SimCLR encoder on train images 1000-4999 per class (labels never read), its training
    time and memory, and its k-NN accuracy (protected subset as the bank, test subset as queries)."""
    if "ssl" in bench.results:
        return bench.results["ssl"]
    out = bench.work / "ssl-encoder"
    extra = ["--set", f"epochs={epochs}"] if epochs else []
    measured = run_measured(protect_cli("surrogate", "ssl", str(bench.surrogate_images()), str(out), *extra))
    record = json.loads((out / "encoder.json").read_text())
    model = load_encoder(out)
    bank, test = load_image_folder(bench.subset), bench.test()
    accuracy = knn_accuracy(encode(model, bank.images), bank.labels, encode(model, test.images), test.labels)
    bench.results["ssl"] = {**measured, "weights": "ssl-encoder/encoder.safetensors", "knn_accuracy": round(accuracy, 4),
                            "epochs": record["training"]["epochs"], "epoch_losses": record["epoch_losses"],
                            "train_seconds": record["seconds"], "threads": torch.get_num_threads()}
    bench.save()
    return bench.results["ssl"]


def ssl_cluster_quality(bench: Bench, key: str = "ssl") -> dict:
    """Purity and NMI of an SSL surrogate's K=10 clusters of the protected subset (the clusters
    `clusters` fits, seed 0) against the true classes and the coarse groups; forward passes only."""
    ssl = bench.results[key]
    if "cluster_quality" not in ssl:
        clean = load_image_folder(bench.subset)
        generator = create_generator("clusters", resolve_config("clusters", overrides={**surrogate_settings(bench, key),
                                                                                       "resolution": 32}), seed=0)
        assignments, _ = generator.cluster(clean.images)
        (coarse,), _ = relabel_sets(LABELLINGS["coarse"], [clean], clean)
        fine, grouped = cluster_quality(assignments, clean.labels), cluster_quality(assignments, coarse.labels)
        ssl["cluster_quality"] = {"nmi": fine["nmi"], "purity": fine["purity"], "coarse_purity": grouped["purity"],
                                  "sizes": [c["size"] for c in fine["clusters"]]}
        bench.save()
    return ssl["cluster_quality"]


def probe_encoder(bench: Bench, model: SSLEncoder) -> dict:
    """k-NN accuracy (protected subset as the bank, test subset as queries) and the purity / NMI
    of K=10 k-means clusters (seed 0) of the protected subset, against the true classes and the
    coarse groups; forward passes only, labels read for this report only."""
    bank, test = load_image_folder(bench.subset), bench.test()
    features = encode(model, bank.images)
    assignments, _ = kmeans(features, 10, seed=0)
    (coarse,), _ = relabel_sets(LABELLINGS["coarse"], [bank], bank)
    fine = cluster_quality(assignments, bank.labels)
    return {"knn_accuracy": round(knn_accuracy(features, bank.labels, encode(model, test.images), test.labels), 4),
            "nmi": fine["nmi"], "purity": fine["purity"], "coarse_purity": cluster_quality(assignments, coarse.labels)["purity"]}


def train_ssl_traced(bench: Bench, epochs: int, every: int) -> dict:
    """A SimCLR encoder trained for ``epochs`` (one cosine schedule over all of them) in
    WORK/ssl-encoder-e{epochs}, probed (:func:`probe_encoder`) every ``every`` epochs from its
    checkpoint. Resumable: the training resumes from its checkpoint, the probes already made are kept."""
    key = f"ssl-e{epochs}"
    if "weights" in bench.results.get(key, {}):
        return bench.results[key]
    out = bench.work / f"ssl-encoder-e{epochs}"
    config = train_config(overrides={"epochs": epochs})
    images = read_unlabelled(bench.surrogate_images(), config.resolution, NullReporter())
    entry = bench.results.setdefault(key, {"trace": []})
    probe_seconds = sum(t["probe_seconds"] for t in entry["trace"])

    def on_epoch(epoch: int, loss: float) -> None:
        nonlocal probe_seconds
        print(f"ssl {key}: epoch {epoch + 1}/{epochs}, NT-Xent {loss:.4f}", file=sys.stderr, flush=True)
        if (epoch + 1) % every and epoch + 1 != epochs:
            return
        started = time.perf_counter()
        model = build_encoder(config)
        state = load_file(str(out / "checkpoint.safetensors"))
        model.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})
        probe = probe_encoder(bench, model.eval())
        seconds = round(time.perf_counter() - started, 1)
        probe_seconds += seconds
        entry["trace"].append({"epoch": epoch + 1, "loss": round(loss, 5), **probe, "probe_seconds": seconds})
        print(f"ssl {key}: epoch {epoch + 1}: {probe}", file=sys.stderr, flush=True)
        bench.save()

    summary = train_encoder(images, config, out, seed=0, source=str(bench.surrogate_images()), on_epoch=on_epoch)
    entry.update({"weights": f"{out.name}/encoder.safetensors", "epochs": epochs,
                  "epoch_losses": [round(v, 5) for v in summary.epoch_losses],
                  "train_seconds": round(summary.seconds - probe_seconds, 1), "resumed_from_epoch": summary.resumed_from_epoch,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "threads": torch.get_num_threads(), "knn_accuracy": entry["trace"][-1]["knn_accuracy"]})
    bench.save()
    return entry


def train_supervised(bench: Bench, epochs: int = 15) -> dict:
    """A small CNN trained with labels on the same disjoint images (the supervised surrogate)."""
    if "supervised" in bench.results:
        return bench.results["supervised"]
    test = bench.test()
    data = load_image_folder(bench.surrogate_images(), classes=test.classes)
    model = build_classifier("small-cnn", len(test.classes), seed=0)
    result = train_classifier(model, data, test, TrainConfig(epochs=epochs), seed=0)
    weights = bench.work / "surrogate-small-cnn-1000-4999.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    bench.results["supervised"] = {"weights": str(weights), "test_accuracy": round(result.final, 4), "epochs": epochs,
                                   "seconds": round(result.seconds, 1)}
    bench.save()
    return bench.results["supervised"]


def surrogate_settings(bench: Bench, surrogate: str) -> dict[str, str]:
    if surrogate == "ssl":
        return {"surrogate": "ssl", "surrogate_weights": str(bench.work / train_ssl(bench, None)["weights"])}
    if surrogate.startswith("ssl-e") and "weights" in bench.results.get(surrogate, {}):
        return {"surrogate": "ssl", "surrogate_weights": str(bench.work / bench.results[surrogate]["weights"])}
    if surrogate == "supervised":
        return {"surrogate": "small-cnn", "surrogate_weights": train_supervised(bench)["weights"]}
    if surrogate == "clip-random":
        return {"surrogate": "clip", "surrogate_model": "protect-small-clip", "surrogate_weights": "random"}
    raise SystemExit(f"unknown surrogate {surrogate!r}; choose ssl, ssl-eN (after `ssl-long --ssl-epochs N`), "
                     "supervised or clip-random")


def row_name(kind: str, surrogate: str, eps: str, k: int = 10) -> str:
    """clusters-SURROGATE-EPS or em-pseudo-SURROGATE-EPS, with -kK when the clusters are not 10."""
    return f"{kind}-{surrogate}-{eps.split('/')[0]}" + (f"-k{k}" if k != 10 else "")


def row_parts(name: str) -> tuple[str, str, str, int]:
    """The inverse of :func:`row_name`: kind, surrogate, eps numerator, K."""
    kind = "em-pseudo" if name.startswith("em-pseudo-") else "clusters"
    rest, k = name[len(kind) + 1:], 10
    head, _, tail = rest.rpartition("-k")
    if head and tail.isdigit():
        rest, k = head, int(tail)
    surrogate, eps = rest.rsplit("-", 1)
    return kind, surrogate, eps, k


def pseudo_folder(bench: Bench, surrogate: str, k: int) -> Path:
    return bench.work / (f"pseudo-{surrogate}" + (f"-k{k}" if k != 10 else ""))


# protection ---------------------------------------------------------------------------------


def fit_clusters(bench: Bench, surrogate: str, eps: str, epochs: int, seed: int, k: int) -> dict:
    name = row_name("clusters", surrogate, eps, k)
    rows = bench.results.setdefault("rows", {})
    if name in rows:
        return rows[name]
    settings = {**surrogate_settings(bench, surrogate), "resolution": "32", "epochs": str(epochs), "clusters": str(k)}
    extra = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    out = bench.work / name
    measured = run_measured(protect_cli("run", "clusters", str(bench.subset), str(out), "--eps", eps, "--seed", str(seed),
                                        "--overwrite", "--allow-outside", *extra))
    record = json.loads((out / "protection.json").read_text())
    rows[name] = {**measured, "settings": settings, "eps": eps, "seed": seed, "fit": record["fit"],
                  "psnr": record["summary"]["mean_psnr_db"]}
    bench.save()
    return rows[name]


def pseudo_label_folder(bench: Bench, surrogate: str, seed: int, k: int) -> tuple[Path, dict]:
    """The protected subset re-filed by the surrogate's k-means clusters (cluster-K/CLASS__FILE
    symlinks): what a user without labels would feed em-classwise. The clusters are the ones
    `clusters` fits (same surrogate, K and seed)."""
    settings = {**surrogate_settings(bench, surrogate), "resolution": 32, "clusters": k}
    generator = create_generator("clusters", resolve_config("clusters", overrides=settings), seed=seed)
    clean = load_image_folder(bench.subset)
    assignments, _ = generator.cluster(clean.images)
    folder = pseudo_folder(bench, surrogate, k)
    for path, cluster in zip(clean.paths, assignments.tolist()):
        link = folder / f"cluster-{cluster}" / path.replace("/", "__")
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to((bench.subset / path).resolve())
    return folder, cluster_quality(assignments, clean.labels)


def fit_em_pseudo(bench: Bench, surrogate: str, eps: str, seed: int, k: int) -> dict:
    name = row_name("em-pseudo", surrogate, eps, k)
    rows = bench.results.setdefault("rows", {})
    if name in rows:
        return rows[name]
    folder, quality = pseudo_label_folder(bench, surrogate, seed, k)
    out = bench.work / name
    measured = run_measured(protect_cli("run", "em-classwise", str(folder), str(out), "--eps", eps, "--seed", str(seed),
                                        "--overwrite", "--allow-outside"))
    record = json.loads((out / "protection.json").read_text())
    rows[name] = {**measured, "eps": eps, "seed": seed, "fit": {**record["fit"], "cluster_quality": quality},
                  "psnr": record["summary"]["mean_psnr_db"]}
    bench.save()
    return rows[name]


def protected_set(bench: Bench, name: str, clean: ImageSet) -> ImageSet:
    """The protected copy of row ``name``, aligned image by image with ``clean``."""
    if not name.startswith("em-pseudo-"):
        _, protected = load_pairs(bench.work / name, bench.subset)
        assert protected.paths == clean.paths
        return protected
    # em-classwise ran on the pseudo-label folder: map cluster-K/CLASS__FILE back to CLASS/FILE.
    _, surrogate, _, k = row_parts(name)
    _, protected = load_pairs(bench.work / name, pseudo_folder(bench, surrogate, k))
    position = {Path(path).name.replace("__", "/"): i for i, path in enumerate(protected.paths)}
    order = torch.tensor([position[path] for path in clean.paths])
    return ImageSet(protected.images[order], clean.labels.clone(), clean.classes, clean.paths)


# victims ------------------------------------------------------------------------------------


def victims(bench: Bench, names: list[str], labellings: list[str], seeds: int, epochs: int) -> None:
    clean = load_image_folder(bench.subset)
    test = load_image_folder(bench.cifar / "test", per_class=200, classes=clean.classes)
    sets = [clean] + [protected_set(bench, n, clean) for n in names if n != "clean"]
    set_names = ["clean"] + [n for n in names if n != "clean"]
    store = bench.results.setdefault("victims", {})
    for labelling in labellings:
        relabelled, relabelled_test = relabel_sets(LABELLINGS[labelling], sets, test)
        for name, train in zip(set_names, relabelled):
            if name not in names:
                continue
            cell = store.setdefault(name, {}).setdefault(labelling, [])
            for seed in range(len(cell), seeds):
                print(f"victim: {name} / {labelling} / seed {seed}", file=sys.stderr, flush=True)
                model = build_classifier("small-cnn", len(relabelled_test.classes), seed=seed)
                result = train_classifier(model, train, relabelled_test, victim_train_config("small-cnn", epochs, len(train)), seed=seed)
                cell.append({"final": round(result.final, 4), "seconds": round(result.seconds, 1)})
                bench.save()


# the table ----------------------------------------------------------------------------------


def mean_std(cell: list[dict] | None) -> str | None:
    if not cell:
        return None
    values = [100 * c["final"] for c in cell]
    if len(values) == 1:
        return f"{values[0]:.1f} (1 seed)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} ({len(values)} seeds)"


SECTION = "P0: label-agnostic protection"


def surrogate_label(bench: Bench, surrogate: str) -> str:
    if surrogate == "ssl" or surrogate.startswith("ssl-e"):
        return f"SimCLR, {bench.results.get(surrogate, {}).get('epochs', '?')} epochs"
    return {"supervised": "supervised small CNN", "clip-random": "random-init CLIP"}.get(surrogate, surrogate)


def describe_row(bench: Bench, name: str, row: dict | None) -> list:
    """The first cells of a table row: what protected the images, how well its clusters follow
    the classes, how far the generators moved the features, and what the generation cost."""
    if name == "clean":
        return ["clean (no protection)", "–", "–", None, None, None, None, None, None, None]
    kind, surrogate, eps, k = row_parts(name)
    pseudo = kind == "em-pseudo"
    fit = (row or {}).get("fit", {})
    quality = fit.get("cluster_quality") or {}
    kl = fit.get("kl") or []
    kl_text = f"{statistics.mean(k['start'] for k in kl):.3f} → {statistics.mean(k['end'] for k in kl):.3f}" if kl else None
    hits = round(100 * statistics.mean(k["hit_rate"] for k in kl)) if kl else None
    label = surrogate_label(bench, surrogate)
    what = (f"em-classwise on pseudo-labels ({label}, {eps}/255, K={k})" if pseudo
            else f"clusters ({label}, {eps}/255, K={k})")
    purity = round(100 * quality["purity"], 1) if quality else None
    return [what, label, f"{eps}/255", (row or {}).get("settings", {}).get("epochs"), quality.get("nmi"), purity, kl_text,
            hits, round(row["seconds"]) if row else None, row.get("peak_rss_mib") if row else None]


def table(bench: Bench, victim_epochs: int) -> None:
    rows = bench.results.get("rows", {})
    store = bench.results.get("victims", {})
    ssl_keys = [k for k in ("ssl", *sorted((k for k in bench.results if k.startswith("ssl-e")), key=lambda k: int(k[5:])))
                if "weights" in bench.results.get(k, {})]
    for key in ssl_keys:
        ssl_cluster_quality(bench, key)
    if ssl_keys:
        write_ssl_tables(bench, ssl_keys)
    if not rows:
        return
    columns = ["protection", "surrogate", "eps", "generator epochs", "cluster NMI", "cluster purity %",
               "KL start → end (mean)", "hit rate %", "generation s", "gen peak RSS MiB",
               "victim acc %, true labels", "coarse labels (2 groups)", "k-means relabelling (10)"]
    body = [describe_row(bench, name, rows.get(name)) + [mean_std(store.get(name, {}).get(k)) for k in ("true", "coarse", "kmeans")]
            for name in ["clean"] + sorted(rows)]
    supervised = bench.results.get("supervised", {})
    notes = (
        f"Small-CNN victims, {victim_epochs} epochs, final clean-test accuracy % (mean ± std over seeds, seed count in "
        "brackets), trained with the true labels, with the coarse relabelling animals vs vehicles "
        "(configs/relabel/cifar10-coarse.yaml) and with `--relabel kmeans:10` (clusters of random small-CNN features of "
        "the clean images; test images take their nearest centre's label). Each relabelling has its own clean baseline "
        "in the first row. Surrogates are trained on CIFAR-10 train images 1000-4999 of each class, disjoint from the "
        "protected 0-999: the SimCLR encoders never read labels (their training: table p0-ssl-surrogate); "
        + (f"the supervised small CNN trained {supervised['epochs']} epochs with labels ({100 * supervised['test_accuracy']:.1f}% "
           "test accuracy); " if supervised else "")
        + "random-init CLIP = protect-small-clip with random weights. `clusters` ran with K=10, resolution 32, seed 0 and "
        "otherwise configs/clusters.yaml; em-classwise with its defaults on the same surrogate's K=10 clusters as classes. "
        "Cluster NMI / purity: the fit's k-means clusters of the protected images against their true classes (labels read "
        "for this report only). KL: each cluster generator's KL to its target centre on 512 fixed images before and after "
        "its training, averaged over the 10 generators; hit rate: share of those images, perturbed, whose features are "
        "nearest to the target centre (mean over generators). Generation: wall time and peak RSS of `protect run` on the "
        "10,000 images, reading and writing included. Empty cells were not run within the CPU budget."
    )
    print_markdown_table(columns, body)
    print(notes)
    write_table("p0-clusters", title="Label-agnostic protection: clusters by surrogate and eps (P0)",
                command="python benchmarks/p0_clusters.py table (after the ssl, fit, em-pseudo and victims steps)",
                protocol="P0", section=SECTION, columns=columns, rows=body, hardware=machine(), notes=notes)


def write_ssl_tables(bench: Bench, keys: list[str]) -> None:
    """The SimCLR encoders (training cost, k-NN accuracy, cluster quality), and the probes made
    while the longer ones trained."""
    columns = ["encoder", "epochs", "NT-Xent first → last epoch", "training s", "peak RSS MiB",
               "weighted 20-NN accuracy %", "clusters of the protected set: NMI", "purity %", "coarse purity %"]
    rows = []
    for key in keys:
        ssl, quality = bench.results[key], bench.results[key]["cluster_quality"]
        rows.append([key, ssl["epochs"], f"{ssl['epoch_losses'][0]:.3f} → {ssl['epoch_losses'][-1]:.3f}",
                     round(ssl["train_seconds"]), ssl["peak_rss_mib"], round(100 * ssl["knn_accuracy"], 1), quality["nmi"],
                     round(100 * quality["purity"], 1), round(100 * quality["coarse_purity"], 1)])
    print_markdown_table(columns, rows)
    write_table("p0-ssl-surrogate", title="Self-supervised clusters surrogate: training cost and k-NN accuracy (P0)",
                command="python benchmarks/p0_clusters.py ssl --ssl-epochs 15; python benchmarks/p0_clusters.py ssl-long "
                        "--ssl-epochs N; then table", protocol="P0", section=SECTION, columns=columns, rows=rows,
                hardware=machine(),
                notes="`protect surrogate ssl` (SimCLR, small CNN 32/64/128, configs/surrogate-ssl.yaml) with the epochs "
                      "shown, each with one cosine schedule over all its epochs, on 40,000 images (CIFAR-10 train "
                      "1000-4999 of each class, labels not read). k-NN: cosine similarity, 20 neighbours weighted by "
                      "exp(s/0.1); bank = the protected P0 subset (10,000, labels read for the evaluation only), queries = "
                      "the P0 test subset (2,000). Clusters: the K=10 k-means clusters `clusters` fits on the protected "
                      "subset (seed 0), scored against the true classes and against animals vs vehicles "
                      "(configs/relabel/cifar10-coarse.yaml); labels read for this report only. Training s: the epochs "
                      "alone (probes excluded). The 15-epoch training ran as a `protect surrogate ssl` child process and "
                      "its epochs 1-4 were slowed by other jobs on the cores (121-157 s each against a steady 32-34 s for "
                      "epochs 5-15); the longer ones ran in the benchmark's process.")
    traced = [k for k in keys if bench.results[k].get("trace")]
    if not traced:
        return
    columns = ["encoder", "epoch", "NT-Xent", "weighted 20-NN accuracy %", "cluster NMI", "purity %", "coarse purity %"]
    rows = [[key, t["epoch"], t["loss"], round(100 * t["knn_accuracy"], 1), t["nmi"], round(100 * t["purity"], 1),
             round(100 * t["coarse_purity"], 1)] for key in traced for t in bench.results[key]["trace"]]
    print_markdown_table(columns, rows)
    write_table("p0-ssl-training-curve", title="Self-supervised surrogate: k-NN accuracy and cluster quality as it trains (P0)",
                command="python benchmarks/p0_clusters.py ssl-long --ssl-epochs N --probe-every 5; then table",
                protocol="P0", section=SECTION, columns=columns, rows=rows, hardware=machine(),
                notes="Probes of the encoder's checkpoint during one training (one cosine schedule over all its epochs, "
                      "so a probe half-way is not what a shorter training would give): k-NN and clusters as in table "
                      "p0-ssl-surrogate (k-means here on the encoder's features directly, K=10, seed 0).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["ssl", "ssl-long", "supervised", "fit", "em-pseudo", "victims", "table"])
    parser.add_argument("args", nargs="*", help="fit / em-pseudo: SURROGATE EPS; victims: ROW,ROW,...")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "results" / "p0")
    parser.add_argument("--ssl-epochs", type=int, default=None, help="SimCLR epochs (default: configs/surrogate-ssl.yaml)")
    parser.add_argument("--probe-every", type=int, default=5, help="ssl-long: epochs between k-NN / cluster probes")
    parser.add_argument("--cluster-epochs", type=int, default=50, help="generator epochs per cluster (official 50)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    parser.add_argument("--k", type=int, default=10, help="fit / em-pseudo: number of clusters (rows get -kK unless 10)")
    parser.add_argument("--labels", default="true,coarse,kmeans")
    parser.add_argument("--seeds", type=int, default=3, help="victim seeds")
    parser.add_argument("--epochs", type=int, default=15, help="victim epochs")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    bench = Bench(args.shared, args.work)
    if args.step == "ssl":
        print(json.dumps(train_ssl(bench, args.ssl_epochs), indent=2))
    elif args.step == "ssl-long":
        print(json.dumps(train_ssl_traced(bench, args.ssl_epochs or 60, args.probe_every)["trace"], indent=2))
    elif args.step == "supervised":
        print(json.dumps(train_supervised(bench), indent=2))
    elif args.step == "fit":
        surrogate, eps = args.args
        print(json.dumps(fit_clusters(bench, surrogate, eps, args.cluster_epochs, args.seed, args.k)["fit"], indent=2))
    elif args.step == "em-pseudo":
        surrogate, eps = args.args
        print(json.dumps(fit_em_pseudo(bench, surrogate, eps, args.seed, args.k)["fit"], indent=2))
    elif args.step == "victims":
        victims(bench, args.args[0].split(","), args.labels.split(","), args.seeds, args.epochs)
    else:
        table(bench, args.epochs)


if __name__ == "__main__":
    main()

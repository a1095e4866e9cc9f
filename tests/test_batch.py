"""protect batch: every export format round-trips (records, fields, order, budget), a killed job
resumes to identical bytes, malicious archives and corrupt records are refused by name, and the
Ray engine writes what the local one writes."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import SIZES, synthetic_rgb
from protect.budget import budget_in_levels, check_budget
from protect.cli import app
from protect.images import decode_image
from protect.runner import PROTECTION_NAME, STATE_DIR_NAME, UsageError, protect_export

EPS_LEVELS = budget_in_levels(8 / 255)
FAST_CLASSWISE = {"max_rounds": 2, "train_steps": 2, "resolution": 16, "batch_size": 8}
FAST_SAMPLEWISE = {"max_rounds": 2, "train_steps": 2, "steps": 2, "resolution": 16, "batch_size": 8}
CLASSES = ("cat", "dog")


def encoded(index: int) -> tuple[bytes, str]:
    """A small synthetic image as JPEG or PNG bytes (alternating), with its suffix."""
    width, height = SIZES[index % len(SIZES)]
    buffer = io.BytesIO()
    if index % 2:
        Image.fromarray(synthetic_rgb(width, height, index)).save(buffer, format="JPEG", quality=95)
        return buffer.getvalue(), ".jpg"
    Image.fromarray(synthetic_rgb(width, height, index)).save(buffer, format="PNG")
    return buffer.getvalue(), ".png"


def records(n: int = 6) -> list[dict[str, Any]]:
    """Source records: id, image bytes and suffix, label, caption, and one extra field."""
    rows = []
    for i in range(n):
        data, suffix = encoded(i)
        rows.append({"id": f"r{i:03d}", "data": data, "suffix": suffix, "label": CLASSES[i % 2],
                     "caption": f"picture number {i}", "score": i * 0.5})
    return rows


# ----------------------------------------------------------------------------------------------
# writers of source exports and readers of protected ones, per format; each reader returns
# [(id, image bytes, other fields)] in record order


def _tar_add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    archive.addfile(info, io.BytesIO(data))


def make_imagefolder(root: Path, rows: list[dict]) -> Path:
    for row in rows:
        (root / "src" / row["label"]).mkdir(parents=True, exist_ok=True)
        (root / "src" / row["label"] / (row["id"] + row["suffix"])).write_bytes(row["data"])
    (root / "src" / "LICENSE.txt").write_text("CC0\n", encoding="utf-8")
    return root / "src"


def read_imagefolder(out: Path) -> list[tuple[str, bytes, dict]]:
    found = sorted(p for p in out.rglob("*.png"))
    assert (out / "LICENSE.txt").read_text(encoding="utf-8") == "CC0\n"
    return sorted(((p.stem, p.read_bytes(), {"label": p.parent.name}) for p in found), key=lambda r: r[0])


def _manifest_rows(root: Path, rows: list[dict]) -> list[dict]:
    (root / "src" / "images").mkdir(parents=True)
    table = []
    for row in rows:
        (root / "src" / "images" / (row["id"] + row["suffix"])).write_bytes(row["data"])
        table.append({"id": row["id"], "image": f"images/{row['id']}{row['suffix']}", "label": row["label"],
                      "caption": row["caption"], "score": str(row["score"])})
    return table


def make_csv(root: Path, rows: list[dict]) -> Path:
    table = _manifest_rows(root, rows)
    with open(root / "src" / "data.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    return root / "src" / "data.csv"


def read_csv(out: Path) -> list[tuple[str, bytes, dict]]:
    with open(out / "data.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [(r.pop("id"), (out / r.pop("image")).read_bytes(), r) for r in rows]


def make_jsonl(root: Path, rows: list[dict]) -> Path:
    table = _manifest_rows(root, rows)
    (root / "src" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table), encoding="utf-8")
    return root / "src" / "data.jsonl"


def read_jsonl(out: Path) -> list[tuple[str, bytes, dict]]:
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text(encoding="utf-8").splitlines()]
    return [(r.pop("id"), (out / r.pop("image")).read_bytes(), r) for r in rows]


def make_tar(root: Path, rows: list[dict], per_shard: int = 3) -> Path:
    (root / "src").mkdir()
    for shard in range(0, len(rows), per_shard):
        with tarfile.open(root / "src" / f"shard-{shard // per_shard:03d}.tar", "w", format=tarfile.GNU_FORMAT) as archive:
            for row in rows[shard : shard + per_shard]:
                _tar_add(archive, row["id"] + row["suffix"], row["data"])
                _tar_add(archive, row["id"] + ".cls", str(CLASSES.index(row["label"])).encode())
                _tar_add(archive, row["id"] + ".txt", row["caption"].encode())
                _tar_add(archive, row["id"] + ".json", json.dumps({"score": row["score"]}).encode())
    return root / "src"


def read_tar(out: Path) -> list[tuple[str, bytes, dict]]:
    result = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
            names = [m.name for m in archive.getmembers()]
        for name in names:
            if name.endswith(".png"):
                key = name[:-4]
                assert names[names.index(name) + 1 : names.index(name) + 4] == [key + ".cls", key + ".txt", key + ".json"]
                fields = {"label": members[key + ".cls"].decode(), "caption": members[key + ".txt"].decode(),
                          "meta": json.loads(members[key + ".json"])}
                result.append((key, members[name], fields))
    return result


def make_parquet(root: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "src").mkdir()
    table = pa.table({
        "image": [{"bytes": r["data"], "path": r["id"] + r["suffix"]} for r in rows],
        "label": [CLASSES.index(r["label"]) for r in rows],
        "caption": [r["caption"] for r in rows],
        "id": [r["id"] for r in rows],
        "score": [r["score"] for r in rows],
    }).replace_schema_metadata({"huggingface": '{"info": "kept"}'})
    pq.write_table(table, root / "src" / "train-00000-of-00001.parquet", row_group_size=2)
    return root / "src"


def read_parquet(out: Path) -> list[tuple[str, bytes, dict]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(out / "train-00000-of-00001.parquet")
    assert parquet.schema_arrow.metadata[b"huggingface"] == b'{"info": "kept"}'
    result = []
    for row in parquet.read().to_pylist():
        image = row.pop("image")
        assert image["path"] == row["id"] + ".png"
        result.append((row.pop("id"), image["bytes"], row))
    return result


def make_zip(root: Path, rows: list[dict]) -> Path:
    (root / "src").mkdir()
    with zipfile.ZipFile(root / "src" / "export.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("README.txt", "about this export\n")
        for row in rows:
            archive.writestr(f"{row['label']}/{row['id']}{row['suffix']}", row["data"])
    return root / "src" / "export.zip"


def read_zip(out: Path) -> list[tuple[str, bytes, dict]]:
    with zipfile.ZipFile(out / "export.zip") as archive:
        names = archive.namelist()
        assert names[0] == "README.txt" and archive.read("README.txt") == b"about this export\n"
        return [(Path(n).stem, archive.read(n), {"label": n.split("/")[0]}) for n in names[1:]]


FORMATS: dict[str, tuple[Callable, Callable]] = {
    "imagefolder": (make_imagefolder, read_imagefolder),
    "csv": (make_csv, read_csv),
    "jsonl": (make_jsonl, read_jsonl),
    "tar": (make_tar, read_tar),
    "parquet": (make_parquet, read_parquet),
    "zip": (make_zip, read_zip),
}


def without_record(tree: dict[str, str]) -> dict[str, str]:
    return {name: digest for name, digest in tree.items() if name != PROTECTION_NAME}


def tree_bytes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def expected_fields(fmt: str, row: dict) -> dict:
    label = row["label"]
    if fmt == "tar":
        return {"label": str(CLASSES.index(label)), "caption": row["caption"], "meta": {"score": row["score"]}}
    if fmt == "parquet":
        return {"label": CLASSES.index(label), "caption": row["caption"], "score": row["score"]}
    if fmt in ("csv", "jsonl"):
        return {"label": label, "caption": row["caption"], "score": str(row["score"])}
    return {"label": label}


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_round_trip_keeps_records_fields_order_and_budget(fmt: str, tmp_path: Path) -> None:
    make, read = FORMATS[fmt]
    rows = records()
    source = make(tmp_path, rows)
    before = tree_bytes(tmp_path / "src")
    summary = protect_export("em-classwise", source, tmp_path / "out", overrides=FAST_CLASSWISE, unit_size=2, workers=1)
    assert summary.exit_code == 0 and summary.written == len(rows) and summary.input_format == fmt
    assert tree_bytes(tmp_path / "src") == before, "the source was modified"
    assert not (tmp_path / "out" / STATE_DIR_NAME).exists(), "job state (with the noise) left in DEST"
    protected = read(tmp_path / "out")
    assert [key for key, _, _ in protected] == [r["id"] for r in rows]
    for (key, data, fields), row in zip(protected, rows):
        assert fields == expected_fields(fmt, row)
        original, result = decode_image(row["data"], key), decode_image(data, key)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert check_budget(original.rgb, result.rgb, 8 / 255, key) <= EPS_LEVELS
    document = json.loads((tmp_path / "out" / PROTECTION_NAME).read_text(encoding="utf-8"))
    assert document["summary"]["written"] == len(rows) and document["input_format"] == fmt


def test_class_noise_is_fitted_once_with_the_labels_and_reusable(tmp_path: Path) -> None:
    source = make_tar(tmp_path, records(8), per_shard=4)
    kept = tmp_path / "kept-protector"
    first = protect_export("em-classwise", source, tmp_path / "a", overrides=FAST_CLASSWISE, unit_size=2,
                           save_protector_to=kept, workers=1)
    assert first.fit.startswith("once")
    assert json.loads((kept / "protector.json").read_text(encoding="utf-8"))["classes"] == ["0", "1"]
    reused = protect_export("em-classwise", source, tmp_path / "b", protector=kept, unit_size=4, workers=1)
    assert reused.fit.startswith("saved protector")
    # The same protected export; only protection.json tells a fit from a reused protector.
    assert json.loads((tmp_path / "b" / PROTECTION_NAME).read_text(encoding="utf-8"))["fit"]["how"].startswith("saved protector")
    assert without_record(tree_bytes(tmp_path / "a")) == without_record(tree_bytes(tmp_path / "b"))
    with pytest.raises(UsageError, match="holds the noise"):
        protect_export("em-classwise", source, tmp_path / "c", save_protector_to=tmp_path / "c" / "p")


def _batch_command(source: Path, dest: Path) -> list[str]:
    sets = [arg for key, value in FAST_SAMPLEWISE.items() for arg in ("--set", f"{key}={value}")]
    return [sys.executable, "-m", "protect.cli", "batch", "em-samplewise", str(source), str(dest),
            "--unit-size", "2", "--workers", "1", *sets]


def _journal_units(dest: Path) -> int:
    journal = dest / STATE_DIR_NAME / "journal.jsonl"
    return journal.read_text(encoding="utf-8").count('"kind": "unit"') if journal.exists() else 0


def test_resume_after_kill_9_gives_identical_bytes(tmp_path: Path) -> None:
    source = make_tar(tmp_path, records(24), per_shard=12)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = subprocess.run(_batch_command(source, tmp_path / "reference"), env=env, capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr

    victim = subprocess.Popen(_batch_command(source, tmp_path / "out"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _journal_units(tmp_path / "out") < 2 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert victim.poll() is None, "the job ended before it could be killed; make it longer"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert _journal_units(tmp_path / "out") < 12, "killed too late to test resuming"
    assert not list((tmp_path / "out").glob("*.tar")), "an output shard appeared before its job finished"

    resumed = subprocess.run(_batch_command(source, tmp_path / "out"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "units already done" in resumed.stderr
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "reference")


def _malicious_tar(path: Path) -> list[str]:
    good, _ = encoded(0)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        _tar_add(archive, "000.png", good)
        _tar_add(archive, "/etc/evil.png", good)
        _tar_add(archive, "../escape.png", good)
        link = tarfile.TarInfo("sym.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
        hard = tarfile.TarInfo("hard.png")
        hard.type, hard.linkname = tarfile.LNKTYPE, "000.png"
        archive.addfile(hard)
        device = tarfile.TarInfo("dev.png")
        device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
        archive.addfile(device)
        _tar_add(archive, "001.png", good)
    return ["/etc/evil.png", "../escape.png", "sym.png", "hard.png", "dev.png"]


def _malicious_zip(path: Path) -> list[str]:
    good, _ = encoded(0)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ok/000.png", good)
        archive.writestr("/abs/evil.png", good)
        archive.writestr("../escape.png", good)
        link = zipfile.ZipInfo("ok/sym.png")
        link.external_attr = (0o120777 << 16)
        archive.writestr(link, "/etc/passwd")
        archive.writestr("ok/001.png", good)
    return ["/abs/evil.png", "../escape.png", "ok/sym.png"]


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_malicious_archive_members_are_refused_by_name(kind: str, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    archive = tmp_path / "src" / f"evil.{kind}"
    bad = (_malicious_tar if kind == "tar" else _malicious_zip)(archive)
    before = tree_bytes(tmp_path)
    result = CliRunner().invoke(app, ["batch", "random", str(archive), str(tmp_path / "out"), "--workers", "1"])
    assert result.exit_code == 1, result.output
    for name in bad:
        assert f"refused archive member {name!r}" in result.output
    after = tree_bytes(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before, "something written outside DEST"
    with (tarfile.open if kind == "tar" else zipfile.ZipFile)(tmp_path / "out" / archive.name) as written:
        names = written.getnames() if kind == "tar" else written.namelist()
    assert names == (["000.png", "001.png"] if kind == "tar" else ["ok/000.png", "ok/001.png"])


def test_corrupt_records_are_reported_by_name_and_the_rest_done(tmp_path: Path) -> None:
    rows = records(4)
    source = make_csv(tmp_path, rows)
    (tmp_path / "src" / "images" / "r001.jpg").write_bytes(rows[1]["data"][:200])  # truncated
    (tmp_path / "src" / "images" / "r002.png").unlink()  # missing
    result = CliRunner().invoke(app, ["batch", "random", str(source), str(tmp_path / "out"), "--workers", "1"])
    assert result.exit_code == 1, result.output
    assert "row 2 (" in result.output and "r001.jpg" in result.output and "truncated or corrupt" in result.output
    assert "row 3 (" in result.output and "r002.png" in result.output and "cannot be read" in result.output
    assert [key for key, _, _ in read_csv(tmp_path / "out")] == ["r000", "r003"]
    failed = json.loads((tmp_path / "out" / PROTECTION_NAME).read_text(encoding="utf-8"))["summary"]["failed"]
    assert len(failed) == 2


def test_usage_errors_exit_2_and_write_nothing(tmp_path: Path) -> None:
    source = make_tar(tmp_path, records(2))
    runner = CliRunner()
    inside = runner.invoke(app, ["batch", "random", str(source), str(source / "out")])
    assert inside.exit_code == 2 and "inside the input" in inside.output
    lossy = runner.invoke(app, ["batch", "random", str(source), str(tmp_path / "o"), "--format", "jpeg"])
    assert lossy.exit_code == 2 and "--allow-lossy" in lossy.output
    assert not (tmp_path / "o").exists() and not (source / "out").exists()
    assert runner.invoke(app, ["batch", "random", str(source), str(tmp_path / "o"), "--workers", "1"]).exit_code == 0
    again = runner.invoke(app, ["batch", "random", str(source), str(tmp_path / "o")])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_ray_engine_and_local_processes_write_what_one_process_writes(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="the Ray engine needs ray[data] (pip install -e '.[batch]')")
    source = make_parquet(tmp_path, records(8))
    protect_export("em-samplewise", source, tmp_path / "single", overrides=FAST_SAMPLEWISE, workers=1)
    protect_export("em-samplewise", source, tmp_path / "local", overrides=FAST_SAMPLEWISE, workers=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = protect_export("em-samplewise", source, tmp_path / "ray", overrides=FAST_SAMPLEWISE,
                                 engine="ray", workers=2)
    finally:
        ray.shutdown()
    assert summary.exit_code == 0 and summary.units == 4
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "single") == tree_bytes(tmp_path / "local")

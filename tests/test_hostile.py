"""Hostile but realistic input to `protect run`, `protect batch` and verification: each class of
input is built here from tiny files, and the promised behaviour checked (docs/security.md):
originals byte-identical, nothing written outside DEST, no secret copied, a named error with
exit code 2 before any fit for a request that cannot be honoured, a named per-file failure with
exit code 1 for a file that cannot be, and bounded memory on a 12-Mpixel photo."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from attacks.report import evaluation_warnings
from attacks.verify import VerifyError, load_verify_data
from conftest import synthetic_rgb, write_image
from protect.cli import app
from protect.images import load_image
from protect.runner import MANIFEST_NAME, PROTECTION_NAME, STATE_DIR_NAME, JobError, protect_export, protect_folder
from protect.runner import unit as unit_module

SECRET = b"password=hunter2\n"


def png(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_rgb(*size, seed=seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def folder(root: Path, per_class: int = 2) -> Path:
    for label in ("cat", "dog"):
        for k in range(per_class):
            write_image(root / label / f"{label}{k}.png", 24, 20, seed=hash((label, k)) % 1000)
    return root


def tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: contents hashed (links by target, not followed)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[rel] = "link->" + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def cli(*args: str | Path):
    return CliRunner().invoke(app, [str(a) for a in args])


def said(result, *fragments: str) -> bool:
    text = "".join(result.output.split())
    return all("".join(fragment.split()) in text for fragment in fragments)


# ----------------------------------------------------------------------------------------------
# what is written: never a file the source reads


def test_batch_refuses_a_destination_holding_the_images_a_manifest_reads(tmp_path: Path) -> None:
    (tmp_path / "export" / "images").mkdir(parents=True)
    for name, seed in (("a", 1), ("b", 2)):
        (tmp_path / "export" / "images" / f"{name}.png").write_bytes(png(seed))
    manifest = tmp_path / "export" / "data.csv"
    manifest.write_text("image,label\nimages/b.png,x\nimages/a.png,y\n", encoding="utf-8")
    before = tree(tmp_path)
    result = cli("batch", "random", manifest, tmp_path / "export" / "images", "--overwrite", "--workers", "1")
    assert result.exit_code == 2 and said(result, "which the job reads")
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# what is read: regular files inside the source, unless the user opts in


def test_links_out_of_the_folder_are_not_followed_unless_allowed(tmp_path: Path) -> None:
    source = folder(tmp_path / "src")
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "secret.txt").write_bytes(SECRET)
    write_image(tmp_path / "private" / "holiday.png", 24, 20, seed=9)
    (source / "dog" / "notes.txt").symlink_to(tmp_path / "private" / "secret.txt")
    (source / "dog" / "holiday.png").symlink_to(tmp_path / "private" / "holiday.png")
    (source / "cat" / "zero.png").symlink_to("/dev/zero")
    before = tree(tmp_path)

    refused = cli("batch", "random", source, tmp_path / "out", "--workers", "1")
    assert refused.exit_code == 1
    assert said(refused, f"failed: {source / 'dog' / 'notes.txt'}", "outside", "--allow-outside")
    assert said(refused, f"failed: {source / 'dog' / 'holiday.png'}")
    written = tree(tmp_path / "out")
    assert "dog/notes.txt" not in written and "dog/holiday.png" not in written and len([k for k in written if k.endswith(".png")]) == 4
    assert SECRET not in b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())

    allowed = cli("batch", "random", source, tmp_path / "out2", "--workers", "1", "--allow-outside")
    assert allowed.exit_code == 1  # /dev/zero is still not a regular file
    assert said(allowed, f"failed: {source / 'cat' / 'zero.png'}", "not a regular file")
    assert (tmp_path / "out2" / "dog" / "holiday.png").exists() and (tmp_path / "out2" / "dog" / "notes.txt").read_bytes() == SECRET
    assert tree(tmp_path / "src") == {k[4:]: v for k, v in before.items() if k.startswith("src/")}


def _hung(signum, frame):
    raise TimeoutError("the run hung on a FIFO")


def test_a_fifo_named_like_an_image_does_not_hang_the_run(tmp_path: Path) -> None:
    source = folder(tmp_path / "src")
    os.mkfifo(source / "cat" / "pipe.png")
    previous = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(120)  # a regression fails the test instead of hanging the suite
    try:
        result = cli("run", "random", source, tmp_path / "out")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result.exit_code == 1 and said(result, f"failed: {source / 'cat' / 'pipe.png'}", "not a regular file")
    assert len(list((tmp_path / "out").rglob("*.png"))) == 4


def test_manifest_rows_outside_its_folder_and_unbounded_files_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "export" / "images").mkdir(parents=True)
    (tmp_path / "export" / "images" / "a.png").write_bytes(png(1))
    (tmp_path / "elsewhere.png").write_bytes(png(2))
    manifest = tmp_path / "export" / "data.jsonl"
    rows = [{"image": "images/a.png"}, {"image": "../elsewhere.png"}, {"image": "/dev/zero"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    summary = protect_export("random", manifest, tmp_path / "out", workers=1)
    assert summary.exit_code == 1 and summary.written == 1
    reasons = {f.path.split(" (")[0].rsplit(":", 1)[-1]: f.reason for f in summary.failed}
    assert "outside" in reasons["row 2"] and "--allow-outside" in reasons["row 2"] and "outside" in reasons["row 3"]
    assert not (tmp_path / "out" / "external").exists()

    opted_in = protect_export("random", manifest, tmp_path / "out2", workers=1, allow_outside=True, max_bytes=10_000)
    assert opted_in.written == 2 and "not a regular file" in opted_in.failed[0].reason
    small = protect_export("random", manifest, tmp_path / "out3", workers=1, max_bytes=100)
    assert small.written == 0 and "--max-bytes" in small.failed[0].reason


def test_symlinked_class_folders_inside_are_read_and_outside_are_named(tmp_path: Path) -> None:
    source = folder(tmp_path / "src")
    folder(tmp_path / "more", per_class=1)
    (source / "bird").symlink_to(tmp_path / "more" / "cat")  # a class folder elsewhere
    (source / "cat" / "loop").symlink_to(source)  # a loop
    summary = protect_folder("random", source, tmp_path / "out")
    assert summary.exit_code == 1 and summary.written == 4
    assert sorted(Path(f.path).name for f in summary.failed) == ["bird", "loop"]
    opted_in = protect_folder("random", source, tmp_path / "out2", allow_outside=True)
    assert opted_in.written == 5 and [Path(f.path).name for f in opted_in.failed] == ["loop"]
    assert json.loads((tmp_path / "out2" / PROTECTION_NAME).read_text())["labels"] == "folders (3 classes)"


# ----------------------------------------------------------------------------------------------
# refused before any fit: exit 2, a named error, nothing written


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--eps", "0.001"], ["rounds to 0 levels"]),
        (["--eps", "0.5"], ["plainly visible"]),
        (["--set", "resolution=100000"], ["resolution", "1024"]),
        (["--set", "resolution=[1"], ["not a valid value"]),
        (["--set", "eps=1/0"], ["division by zero"]),
        (["--max-pixels", "0"], ["--max-pixels"]),
        (["--max-bytes", "-1"], ["--max-bytes"]),
    ],
)
def test_impossible_settings_exit_2(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    source = folder(tmp_path / "src", per_class=1)
    result = cli("run", "random", source, tmp_path / "out", *args)
    assert result.exit_code == 2 and said(result, *fragments), result.output
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_written_is_refused_before_the_fit(tmp_path: Path) -> None:
    source = folder(tmp_path / "src", per_class=1)
    (tmp_path / "file").write_text("not a folder")
    result = cli("run", "em-classwise", source, tmp_path / "file" / "out")
    assert result.exit_code == 2 and said(result, "cannot write into")


def test_a_second_job_into_the_same_output_is_refused(tmp_path: Path) -> None:
    source = folder(tmp_path / "src", per_class=1)
    (tmp_path / "out").mkdir()
    handle = os.open(tmp_path / "out", os.O_RDONLY)
    fcntl.flock(handle, fcntl.LOCK_EX)  # what a running job holds
    try:
        result = cli("run", "random", source, tmp_path / "out")
    finally:
        os.close(handle)
    assert result.exit_code == 2 and said(result, "another protect job is writing into")
    assert list((tmp_path / "out").iterdir()) == []


def test_resume_with_other_settings_after_the_run_finished_is_refused(tmp_path: Path) -> None:
    source = folder(tmp_path / "src", per_class=1)
    assert cli("run", "random", source, tmp_path / "out", "--seed", "1").exit_code == 0
    before = tree(tmp_path / "out")
    result = cli("run", "random", source, tmp_path / "out", "--seed", "2", "--resume")
    assert result.exit_code == 2 and said(result, "nothing to resume")
    assert tree(tmp_path / "out") == before


def test_damaged_protectors_are_refused_by_name(tmp_path: Path) -> None:
    source = folder(tmp_path / "src")
    saved = tmp_path / "keys"
    fast = {"max_rounds": 1, "train_steps": 1, "resolution": 16}
    protect_folder("em-classwise", source, tmp_path / "out", overrides=fast, save_protector_to=saved)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "protector.json").write_text("{not json")
    (garbage / "protector.safetensors").write_bytes(b"\x00" * 16)
    result = cli("run", "em-classwise", source, tmp_path / "o1", "--protector", garbage)
    assert result.exit_code == 2 and said(result, "protector.json", "not valid JSON")
    (garbage / "protector.json").write_text((saved / "protector.json").read_text())
    result = cli("run", "em-classwise", source, tmp_path / "o2", "--protector", garbage)
    assert result.exit_code == 2 and said(result, "protector.safetensors", "not a readable safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / "protector.safetensors"))
    save_file({k: v * float("nan") for k, v in tensors.items()}, str(garbage / "protector.safetensors"))
    result = cli("run", "em-classwise", source, tmp_path / "o3", "--protector", garbage)
    assert result.exit_code == 2 and said(result, "NaN")
    # A protector whose record claims a visible budget is refused like the setting itself.
    meta = json.loads((saved / "protector.json").read_text())
    meta["config"]["eps"] = 0.5
    (garbage / "protector.json").write_text(json.dumps(meta))
    save_file(tensors, str(garbage / "protector.safetensors"))
    result = cli("run", "em-classwise", source, tmp_path / "o5", "--protector", garbage)
    assert result.exit_code == 2 and said(result, "plainly visible")
    (garbage / "protector.json").write_text((saved / "protector.json").read_text())
    # A protector whose noise is all zero writes copies identical to the originals: not protected.
    save_file({k: v * 0 for k, v in tensors.items()}, str(garbage / "protector.safetensors"))
    result = cli("run", "em-classwise", source, tmp_path / "o4", "--protector", garbage)
    assert result.exit_code == 1 and said(result, "not protected", "no output pixel differs")


# ----------------------------------------------------------------------------------------------
# archives and tables that lie


def test_a_truncated_tar_reports_what_it_lost_and_the_rest_is_done(tmp_path: Path) -> None:
    shard = tmp_path / "src" / "shard.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as archive:
        for key in ("000", "001", "002"):
            data = png(int(key), size=(64, 64))
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = shard.read_bytes()
    cut = data.index(b"IEND", data.index(b"002.png")) - 200  # inside the last member's data
    shard.write_bytes(data[:cut])
    summary = protect_export("random", shard, tmp_path / "out", workers=1)
    assert summary.exit_code == 1 and summary.written == 2
    # The cut member by name, and where the archive ends: nothing is lost silently.
    assert summary.failed[0].path.endswith("shard.tar:002") and "truncated" in summary.failed[0].reason
    assert all("truncated" in f.reason for f in summary.failed)
    with tarfile.open(tmp_path / "out" / "shard.tar") as archive:
        assert archive.getnames() == ["000.png", "001.png"]


def test_zip_members_over_the_byte_limit_and_corrupt_parquet(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with zipfile.ZipFile(tmp_path / "src" / "data.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("small.png", png(1))
        archive.writestr("bomb.png", b"\x00" * 2_000_000)  # compresses to a few kB
    summary = protect_export("random", tmp_path / "src" / "data.zip", tmp_path / "out", workers=1, max_bytes=1_000_000)
    assert summary.written == 1 and "bomb.png" in summary.failed[0].path and "--max-bytes" in summary.failed[0].reason
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "data.parquet").write_bytes(b"PAR1 not really a parquet file PAR1")
    result = cli("batch", "random", tmp_path / "pq" / "data.parquet", tmp_path / "out2")
    assert result.exit_code == 2 and said(result, "data.parquet", "not a readable Parquet file")


def test_animated_images_say_what_is_written_and_long_names_are_named_failures(tmp_path: Path) -> None:
    source = folder(tmp_path / "src", per_class=1)
    frames = [Image.fromarray(synthetic_rgb(24, 20, seed=s)) for s in range(3)]
    frames[0].save(source / "cat" / "moving.png", save_all=True, append_images=frames[1:])
    stem = "n" * 248  # stem.jpg and stem.png both become stem.png: the second needs a 256-byte name
    write_image(source / "dog" / f"{stem}.jpg", 24, 20, seed=5)
    write_image(source / "dog" / f"{stem}.png", 24, 20, seed=6)
    summary = protect_folder("random", source, tmp_path / "out")
    assert summary.written == 4 and [Path(f.path).name for f in summary.failed] == [f"{stem}.png"]
    assert "255" in summary.failed[0].reason
    assert (tmp_path / "out" / "dog" / f"{stem}.png").exists()  # a 252-byte name is fine
    # The animation is not flattened silently: its record says which frame the copy holds.
    records = {json.loads(line)["input"]: json.loads(line) for line in (tmp_path / "out" / MANIFEST_NAME).read_text().splitlines()}
    assert "3 frames" in records["cat/moving.png"]["notes"][0] and "first is protected" in records["cat/moving.png"]["notes"][0]


# ----------------------------------------------------------------------------------------------
# a failure after writing leaves the output consistent


def test_a_crash_after_writing_keeps_the_output_consistent_and_resumable(tmp_path: Path, monkeypatch) -> None:
    source = folder(tmp_path / "src", per_class=3)
    protect_folder("random", source, tmp_path / "whole", unit_size=2)
    real, calls = unit_module._process_unit, []

    def failing(job, unit):
        calls.append(unit.index)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(job, unit)

    monkeypatch.setattr(unit_module, "_process_unit", failing)
    with pytest.raises(JobError, match="No space left on device.*--resume"):
        protect_folder("random", source, tmp_path / "out", unit_size=2)
    monkeypatch.undo()
    listed = [json.loads(line)["output"] for line in (tmp_path / "out" / MANIFEST_NAME).read_text().splitlines()]
    assert len(listed) == 2 and all((tmp_path / "out" / name).exists() for name in listed)
    assert (tmp_path / "out" / STATE_DIR_NAME).exists()  # the fit, kept for --resume (and said so)
    resumed = protect_folder("random", source, tmp_path / "out", unit_size=2, resume=True)
    assert resumed.exit_code == 0 and resumed.already_done == 2
    assert tree(tmp_path / "out") == tree(tmp_path / "whole")


def test_running_out_of_memory_on_one_image_fails_that_image_only(tmp_path: Path, monkeypatch) -> None:
    source = folder(tmp_path / "src")
    real = unit_module.ssim

    def ssim(original, protected):
        if original.shape == (20, 24, 3) and original[0, 0, 0] == load_image(source / "cat" / "cat0.png").rgb[0, 0, 0]:
            raise MemoryError
        return real(original, protected)

    monkeypatch.setattr(unit_module, "ssim", ssim)
    summary = protect_folder("random", source, tmp_path / "out")
    assert summary.exit_code == 1 and summary.written == 3
    assert [Path(f.path).name for f in summary.failed] == ["cat0.png"] and "memory" in summary.failed[0].reason
    assert not (tmp_path / "out" / "cat" / "cat0.png").exists() and not (tmp_path / "out" / STATE_DIR_NAME).exists()
    assert len((tmp_path / "out" / MANIFEST_NAME).read_text().splitlines()) == 3


# ----------------------------------------------------------------------------------------------
# verification measures the budget instead of trusting the claim


def test_verify_measures_the_budget_and_flags_a_copied_test_set(tmp_path: Path) -> None:
    clean, test = folder(tmp_path / "clean", per_class=3), folder(tmp_path / "test", per_class=3)
    for k, path in enumerate(sorted(test.rglob("*.png"))):
        write_image(path, 24, 20, seed=500 + k)
    written = protect_folder("random", clean, tmp_path / "prot", eps=12 / 255).max_levels
    claim = json.loads((tmp_path / "prot" / PROTECTION_NAME).read_text())
    claim["config"]["eps"] = 4 / 255  # an edited record
    (tmp_path / "prot" / PROTECTION_NAME).write_text(json.dumps(claim))
    data = load_verify_data(tmp_path / "prot", clean, test)
    assert written > 4 and round(data.eps * 255) == written and round(data.claimed_eps * 255) == 4
    assert (data.control.images.int() - data.clean.images.int()).abs().max() > 4  # the control uses the measured eps
    warnings = evaluation_warnings([], data)
    assert any("claims eps 4/255" in w and f"{written}/255" in w for w in warnings)
    assert not any("copies of training images" in w for w in warnings)
    # The protected copy given as the test set.
    copied = load_verify_data(tmp_path / "prot", clean, tmp_path / "prot")
    assert any("copies of training images" in w for w in evaluation_warnings([], copied))


def test_verify_refuses_a_manifest_that_points_outside_its_folders(tmp_path: Path) -> None:
    clean, test = folder(tmp_path / "clean"), folder(tmp_path / "test")
    protect_folder("random", clean, tmp_path / "prot")
    lines = (tmp_path / "prot" / MANIFEST_NAME).read_text().splitlines()
    record = json.loads(lines[0])
    record["input"] = "../../etc/passwd"
    (tmp_path / "prot" / MANIFEST_NAME).write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(VerifyError, match=r"'\.\.' in path"):
        load_verify_data(tmp_path / "prot", clean, test)


# ----------------------------------------------------------------------------------------------
# bounded memory


MEMORY_BUDGET_MIB = 512  # what one 12-Mpixel photo may add to a run's peak memory (measured: about 310)

MEASURE = """
import json, sys
from pathlib import Path
from protect.runner import protect_folder

def memory():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}

tiny, big, out = (Path(arg) for arg in sys.argv[1:])
protect_folder("random", tiny, out / "tiny")  # imports, first allocations
before = memory()["VmRSS"]
Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current size
assert protect_folder("random", big, out / "big").written == 1
print(json.dumps(memory()["VmHWM"] - before))
"""


def test_a_12_megapixel_photo_stays_within_the_memory_budget(tmp_path: Path) -> None:
    """Decoding (twice: fit and apply), noise at full size, PNG encoding and the quality
    metrics of a 4000 x 3000 photo raise a run's peak memory by at most MEMORY_BUDGET_MIB (a
    whole-image SSIM alone needed about 1 KB per pixel, 12 GB)."""
    height, width = 3000, 4000
    yy, xx = np.mgrid[0:height, 0:width]
    photo = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], axis=2).astype(np.uint8)
    for name, pixels in (("big", photo), ("tiny", photo[:30, :40])):
        (tmp_path / name).mkdir()
        Image.fromarray(pixels).save(tmp_path / name / "photo.jpg", quality=90)
    result = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "tiny"), str(tmp_path / "big"), str(tmp_path / "out")],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    added = json.loads(result.stdout.strip().splitlines()[-1])
    assert added <= MEMORY_BUDGET_MIB, f"a 12-Mpixel photo added {added:.0f} MiB to the peak (budget {MEMORY_BUDGET_MIB})"

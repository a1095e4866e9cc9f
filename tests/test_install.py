"""The package as users install it: a wheel, in a fresh virtual environment outside the
checkout, reads exactly the configs the checkout reads, and `protect run` works from there.

torch and the other dependencies are not installed again: the fresh environment reaches this
environment's site-packages through a ``.pth`` path line. A path line adds the folder to
``sys.path`` without processing the ``.pth`` files inside it, so the editable install of the
checkout stays invisible there, and the test checks that the copy imported is the wheel's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import numpy as np

from protect.config import config_to_dict, read_default_config
from protect.generator import available_methods, resolve_config
from protect.images import load_image
from protect.runner import protect_folder
from protect.t2ue.cli import train_config

ROOT = Path(__file__).resolve().parents[1]
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Keys without a usable default (t2ue needs a trained generator; an untrained one resolves).
RESOLVE_OVERRIDES = {"t2ue": {"generator": "random", "surrogate_model": "protect-tiny-clip"}}

PROBE = """
import dataclasses, json, sys
import attacks, protect, protect.configs
from attacks.relabel import coarse_groups
from protect.config import config_to_dict, read_default_config
from protect.generator import available_methods, resolve_config
from protect.t2ue.cli import train_config
overrides = json.loads(sys.argv[1])
print(json.dumps({
    "files": [protect.__file__, attacks.__file__, protect.configs.__file__],
    "defaults": {m: read_default_config(m + ".yaml")[1] for m in available_methods()},
    "resolved": {m: config_to_dict(resolve_config(m, overrides=overrides.get(m))) for m in available_methods()},
    "t2ue_train": dataclasses.asdict(train_config(None, {})),
    "relabel": coarse_groups("cifar10-coarse", json.loads(sys.argv[2])),
}))
"""


def checkout_answers() -> dict:
    from attacks.relabel import coarse_groups

    return {
        "defaults": {m: read_default_config(f"{m}.yaml")[1] for m in available_methods()},
        "resolved": {m: config_to_dict(resolve_config(m, overrides=RESOLVE_OVERRIDES.get(m))) for m in available_methods()},
        "t2ue_train": dataclasses.asdict(train_config(None, {})),
        "relabel": list(coarse_groups("cifar10-coarse", CIFAR_CLASSES)),
    }


def build_wheel(tmp: Path) -> Path:
    """A wheel of the checkout, built from a copy of its package sources."""
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("protect", "attacks", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp / "dist"), str(source)]
    if _setuptools_major() >= 77:  # what pyproject's build-system asks for; else pip builds in isolation
        command.insert(5, "--no-build-isolation")
    subprocess.run(command, check=True, cwd=tmp)
    return next((tmp / "dist").glob("protect-*.whl"))


def _setuptools_major() -> int:
    try:
        return int(metadata.version("setuptools").split(".")[0])
    except metadata.PackageNotFoundError:
        return 0


def fresh_environment(tmp: Path, wheel: Path) -> Path:
    """A new virtual environment holding the wheel, borrowing this one's dependencies."""
    env = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
                    str(wheel)], check=True, cwd=tmp)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "borrowed-dependencies.pth").write_text("".join(f"{path}\n" for path in paths), encoding="utf-8")
    return env


def test_wheel_installed_elsewhere_reads_the_same_configs_and_runs(tmp_path: Path) -> None:
    env = fresh_environment(tmp_path, build_wheel(tmp_path))
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    clean_env.update(HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    work = tmp_path / "work"  # outside the checkout: nothing resolves relative to it
    work.mkdir()

    probe = subprocess.run(
        [str(env / "bin" / "python"), "-c", PROBE, json.dumps(RESOLVE_OVERRIDES), json.dumps(CIFAR_CLASSES)],
        cwd=work, env=clean_env, capture_output=True, text=True,
    )
    assert probe.returncode == 0, probe.stderr
    installed = json.loads(probe.stdout)
    for file in installed.pop("files"):
        assert Path(file).is_relative_to(env) and not Path(file).is_relative_to(ROOT), f"imported from {file}"
    assert installed == json.loads(json.dumps(checkout_answers()))

    # `protect run` from the wheel writes what the checkout writes (em-classwise: its YAML's
    # defaults, one step and stop error 0.1, differ from the dataclass's).
    result = subprocess.run(
        [str(env / "bin" / "protect"), "run", "em-classwise", str(ROOT / "samples" / "labelled"), "out"],
        cwd=work, env=clean_env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    protect_folder("em-classwise", ROOT / "samples" / "labelled", tmp_path / "checkout-out")
    written = sorted(p.relative_to(work / "out") for p in (work / "out").rglob("*.png"))
    assert len(written) == 6
    for rel in written:
        assert np.array_equal(load_image(work / "out" / rel).rgb, load_image(tmp_path / "checkout-out" / rel).rgb), rel

    commands = subprocess.run([str(env / "bin" / "protect"), "--help"], cwd=work, env=clean_env, capture_output=True, text=True)
    assert commands.returncode == 0 and all(name in commands.stdout for name in ("run", "batch", "t2ue", "verify"))

"""A non-editable install runs from any folder: the presets and recipes travel as package data.

The wheel is built from a copy of the checkout's tracked files, installed into a target folder,
and run through its console script from an empty folder (the checkout is nowhere on the path).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

SMALL_DEMO = ["--videos", "6", "--min-seconds", "10", "--max-seconds", "12", "--epochs", "2",
              "--quiet"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(target, run)``: the wheel installed into ``target``; ``run(*args, cwd)`` runs its
    ``losa-tal`` script with the target alone on PYTHONPATH."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], cwd=REPO, capture_output=True,
                             check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(root / "dist"), str(source)], check=True, timeout=300,
                   capture_output=True)
    (wheel,) = (root / "dist").glob("losa_tal-*.whl")
    target = root / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True, timeout=300, capture_output=True)

    def run(*args, cwd, timeout=120):
        env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
        return subprocess.run([str(target / "bin" / "losa-tal"), *map(str, args)],
                              capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=timeout)

    return target, run


def test_the_wheel_carries_the_presets_and_recipes_but_no_bare_configs_package(installed):
    target, _ = installed
    shipped = {str(p.relative_to(target / "losa_tal_configs")) for p in
               (target / "losa_tal_configs").glob("*/*.json")}
    assert shipped == {str(p.relative_to(REPO / "configs")) for p in
                       (REPO / "configs").glob("*/*.json")}
    assert not (target / "configs").exists()


def test_an_installed_extract_finds_its_presets_from_an_empty_folder(installed, tmp_path):
    _, run = installed
    result = run("extract", "--preset", "thumos", cwd=tmp_path)
    # The preset is found: the error is the preset's own hint for the missing checkpoint.
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: checkpoints/vit_g_hybrid_pt_1200e_k710_ft.pth: "
                                    "checkpoint not found; download "), result.stderr
    result = run("train", "--config", "thumos_vitg_losa", "--print-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert '"store": "stores/thumos_vitg"' in result.stdout


@pytest.mark.slow
def test_an_installed_demo_runs_from_an_empty_folder(installed, tmp_path):
    target, run = installed
    result = run("demo", "--out", "out", *SMALL_DEMO, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "report.json").is_file()
    assert "head_only" in result.stdout and "average" in result.stdout
    # The code that ran is the installed copy, not the checkout.
    where = subprocess.run([sys.executable, "-c", "import synth.demo; print(synth.demo.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "PYTHONPATH": str(target)})
    assert Path(where.stdout.strip()).is_relative_to(target), where

"""The GPU check must start on the bare, offline GPU machine: its python3 holds only the packages
of bench/offline/gpu_machine_packages.txt, the rest travels as wheels, and the working tree that
travels (tracked files plus the wheels) is limited to 64 MiB (docs/gpu_check.md)."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "bench" / "offline"))
from gpu_machine_packages import (gpu_machine_packages, installed_closure,  # noqa: E402
                                  missing_requirements, normalise, requirement_name)

MIB = 2 ** 20
# What travels with the device call, at most (the limit is 64 MiB; 4 MiB are left for untracked
# files and the call's own overhead).
TREE_AND_WHEELS_LIMIT = 60 * MIB
# The cp312 wheels of bench/device_wheels.sh, as measured on 2026-12-05 (pinned to this venv's
# versions: av 18.1.0, decord 0.6.0, numcodecs 0.16.6, zarr 3.1.6, donfig, google-crc32c,
# orjson): what the tracked tree must leave room for when no wheels were fetched here.
WHEELS_MEASURED = 59218854
DEVICE_WHEELS = REPO / "device_wheels"
PROJECT = {"adapt", "bench", "evaluation", "extract", "head", "store", "synth", "training",
           "cli", "losa_tal", "losa_distributed", "tests", "helpers"}
# Process-group plumbing, not collectives.
NOT_COLLECTIVES = {"init_process_group", "destroy_process_group", "is_initialized",
                   "is_available", "get_rank", "get_world_size", "get_backend", "rendezvous"}


def module_file(name: str) -> Path | None:
    """The project file of a module; the tests' helpers are found where the tests put them on
    sys.path (tests/)."""
    for root in (REPO, REPO / "tests"):
        base = root.joinpath(*name.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def imported_names(path: Path, package: str) -> set:
    """Every module a file imports, at any depth of its code (lazy imports included), with
    ``from a import b`` giving both a and a.b (b may be a submodule)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(filter(None, [*parts, base]))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_closure(roots) -> tuple[set, set]:
    """The project files reachable from ``roots`` through imports, and the top-level names of
    everything else they import."""
    files, outside, todo = set(), set(), list(roots)
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files.add(path)
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        package = module.removesuffix(".__init__") if path.name == "__init__.py" else \
            module.rpartition(".")[0]
        for name in imported_names(path, package):
            top = name.split(".")[0]
            if top not in PROJECT:
                outside.add(top)
                continue
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # the packages on the way, then the module
                found = module_file(".".join(parts[:depth]))
                if found is not None:
                    todo.append(found)
    return files, outside


def test_the_gpu_check_imports_only_what_the_gpu_machine_has_or_the_wheels_bring():
    """bench/gpu_check.py and cli.py (its epoch and demo sections run `cli.py train`), every
    import at any depth of every project module they reach: no test helper, and no package
    outside the GPU machine's list and the wheels' distributions."""
    files, outside = import_closure([REPO / "bench" / "gpu_check.py", REPO / "cli.py"])
    assert not [f for f in files if f.is_relative_to(REPO / "tests")]
    assert REPO / "extract" / "pipeline.py" in files and REPO / "bench" / "loader.py" in files
    owners = importlib.metadata.packages_distributions()
    wheels = {normalise(d.metadata["Name"]) for d in installed_closure()}
    allowed = gpu_machine_packages() | wheels
    third_party = sorted(outside - set(sys.stdlib_module_names) - {"__future__"})
    unowned = [name for name in third_party if name not in owners]
    assert not unowned, f"imported, but no installed distribution provides: {unowned}"
    foreign = {name: owners[name] for name in third_party
               if not {normalise(d) for d in owners[name]} & allowed}
    assert not foreign, f"not on the GPU machine and not among the wheels: {foreign}"
    # the wheels are what the check needs beyond the machine: each is imported or needed
    assert {"av", "decord", "zarr", "orjson"} <= set(third_party)
    assert {"torch", "numpy", "click"} <= set(third_party)


def test_the_wheels_are_setup_cfgs_requirements_the_machine_lacks_with_their_closure():
    missing = {requirement_name(r) for r in missing_requirements()}
    assert missing == {"av", "decord", "zarr", "orjson"}  # issue 20's list, read from setup.cfg
    closure = {normalise(d.metadata["Name"]) for d in installed_closure()}
    assert missing < closure and not closure & gpu_machine_packages()
    assert {"numcodecs", "donfig", "google-crc32c"} <= closure  # zarr's


def test_the_tracked_tree_leaves_room_for_the_wheels():
    tree = tracked_tree_bytes()
    assert tree + WHEELS_MEASURED < TREE_AND_WHEELS_LIMIT, (
        f"tracked tree {tree / MIB:.1f} MiB + wheels {WHEELS_MEASURED / MIB:.1f} MiB")


def test_the_fetched_wheels_and_the_tracked_tree_fit_the_device_call():
    wheels = sorted(DEVICE_WHEELS.glob("*.whl"))
    if not wheels:
        pytest.skip(f"{DEVICE_WHEELS.name}/ holds no wheels here: `bench/device_wheels.sh "
                    f"{DEVICE_WHEELS.name}` fetches them (needs PyPI)")
    for wheel in wheels:  # for CPython 3.12 on x86-64 Linux (or any Python, any platform)
        python, abi, platform = wheel.stem.split("-")[-3:]
        stable = abi == "abi3" and int(python.removeprefix("cp3")) <= 12
        assert python in ("cp312", "py3") or stable, wheel.name
        assert re.search(r"manylinux.*x86_64|any", platform), wheel.name
    names = {normalise(w.name.split("-")[0]) for w in wheels}
    assert names == {normalise(d.metadata["Name"]) for d in installed_closure()}
    total = tracked_tree_bytes() + sum(w.stat().st_size for w in wheels)
    assert total < TREE_AND_WHEELS_LIMIT, f"{total / MIB:.1f} MiB"


def tracked_files() -> list:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    return [REPO / name for name in listed if name and (REPO / name).is_file()]


def tracked_tree_bytes() -> int:
    return sum(path.stat().st_size for path in tracked_files())


def test_every_collective_the_code_calls_is_run_by_the_check():
    from bench.gpu_check import COLLECTIVES, collectives_section

    called = set()
    for path in tracked_files():
        if path.suffix != ".py" or path.is_relative_to(REPO / "tests") or \
                path.is_relative_to(REPO / "bench"):
            continue
        called.update(re.findall(r"\b(?:dist|torch\.distributed)\.(\w+)\(", path.read_text()))
    assert called - NOT_COLLECTIVES <= set(COLLECTIVES), called
    assert {"all_reduce", "barrier"} <= called  # the search finds them where they are
    import inspect

    source = inspect.getsource(collectives_section)
    for wrapper in ("sum_across", "gather_tensors", "gather_json", "barrier",
                    "DistributedDataParallel"):
        assert wrapper in source


def offline_python(tmp_path, code: str, site: Path | None = None):
    path = [str(REPO / "bench" / "offline"), str(REPO)] + ([str(site)] if site else [])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(path)})


def test_the_rehearsal_hides_what_the_gpu_machine_lacks_and_takes_it_from_the_wheels(tmp_path):
    hidden = offline_python(tmp_path, "import torch, numpy, click, yaml\nimport av")
    assert hidden.returncode == 1
    assert re.search(r"ModuleNotFoundError: No module named 'av' \(offline rehearsal: av is not "
                     r"on the GPU machine; bench/offline/gpu_machine_packages.txt\)",
                     hidden.stderr), hidden.stderr
    moto = offline_python(tmp_path, "import moto")  # the development venv's test server
    assert "moto is not on the GPU machine" in moto.stderr
    site = tmp_path / "site"
    copied = subprocess.run([sys.executable, str(REPO / "bench" / "offline" /
                                                 "gpu_machine_packages.py"),
                             "copy-installed", str(site)], capture_output=True, text=True,
                            check=True).stdout.split()
    assert {c.split("==")[0] for c in copied} >= {"av", "decord", "zarr", "orjson"}
    found = offline_python(tmp_path, "import json, av, decord, zarr, numcodecs, orjson\n"
                                     "print(json.dumps([m.__file__ for m in "
                                     "(av, decord, zarr, numcodecs, orjson)]))", site)
    assert found.returncode == 0, found.stderr[-2000:]
    assert all(Path(f).is_relative_to(site) for f in json.loads(found.stdout))


@pytest.mark.slow
def test_the_reduced_gpu_check_runs_offline_with_only_the_gpu_machines_packages(tmp_path):
    """What `make gpu-check` runs on a GPU node, at toy sizes on the CPU, with only the GPU
    machine's packages importable plus the wheels (fetched ones for this Python if
    device_wheels_pyXY/ holds them, else this venv's copies of the same distributions)."""
    wheels = REPO / f"device_wheels_py{sys.version_info.major}{sys.version_info.minor}"
    command = ["bash", str(REPO / "bench" / "gpu_check.sh"), "--rehearse", "--out",
               str(tmp_path / "out")]
    if list(wheels.glob("*.whl")):
        command += ["--wheels", str(wheels)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500,
                            env={**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"})
    output = result.stdout
    assert result.returncode == 0, output[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    sections = summary["sections"]
    assert list(sections) == ["device", "sdpa", "backbone", "resize", "pipeline", "train",
                              "crosscheck", "epoch", "loader", "collectives", "demo"]
    for name, record in sections.items():
        assert record["status"] == "ok" and record["lines"], (name, record)
        assert re.search(rf"^== {name}: ok, \d+ s \(timeout \d+ s\)$", output, re.MULTILINE)
        assert all(f"{name}: {line}" in output for line in record["lines"])
    assert summary["reduced"] and re.search(r"^gpu_check: 11 of 11 sections ok in \d+ s",
                                            output, re.MULTILINE)
    device = sections["device"]["figures"]
    site = next(folder for folder, names in device["package_folders"].items() if "av" in names)
    assert "gpu_check_site" in site
    assert {"av", "decord", "zarr", "numcodecs", "orjson"} <= set(
        device["package_folders"][site])
    kernels = {call["caller"]: call["kernel"] for call in sections["sdpa"]["figures"]["calls"]}
    assert {"extract.backbone", "adapt.losa"} <= set(kernels)
    assert all(k == "math (unfused)" or k.startswith("flash") for k in kernels.values())
    assert [line.split(":")[0] for line in sections["train"]["lines"]] == [
        "LoSA", "LoSA checkpoint_layers", "head-only"]
    errors = sections["crosscheck"]["figures"]["errors"]
    assert errors["fp32"] == {"outputs": 0.0, "losses": 0.0, "gradients": 0.0}  # CPU vs CPU
    assert 0 < errors["bf16 autocast"]["gradients"] <= 0.2
    assert any("cached in RAM" in line for line in sections["epoch"]["lines"])
    assert sections["loader"]["figures"]["cached_gb_s"] > 0
    demo = sections["demo"]["figures"]
    assert demo["within"] and max(demo["average_map"].values()) > 0
    # on the CPU, --resize-on device is the official transform itself
    assert re.search(r"cpu: max \|pixel difference\| 0/255, max \|feature difference\| 0, ",
                     sections["resize"]["lines"][0])


def test_a_section_past_its_time_is_ended_and_the_summary_says_so(tmp_path):
    """--budget cuts each section's timeout to what is left: the demo (a minute or more) is
    killed with its process group, the next section is skipped, and summary.json says both."""
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--only",
                             "demo,device", "--budget", "8", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-2000:]
    assert re.search(r"^== demo: timed out, \d+ s \(timeout [5-8] s\)$", result.stdout,
                     re.MULTILINE), result.stdout
    assert "== device: skipped (budget spent)" in result.stdout
    sections = json.loads((tmp_path / "summary.json").read_text())["sections"]
    assert sections["demo"]["status"] == "timed out" and sections["demo"]["lines"] == []
    assert sections["device"]["status"] == "skipped (budget spent)"
    assert re.search(r"^gpu_check: 0 of 2 sections ok", result.stdout, re.MULTILINE)

"""What the GPU machine's python3 holds, and what the project needs beyond it.

gpu_machine_packages.txt beside this file is the one list; bench/device_wheels.sh asks this
module what to fetch (standard library only: it runs on any python3 with pip), sitecustomize.py
beside it hides everything else during the offline rehearsal, and
tests/test_gpu_check_offline.py checks the GPU check's imports against it.

    python3 gpu_machine_packages.py missing              setup.cfg's requirements the list lacks
    python3 gpu_machine_packages.py missing-pins REPORT  name==version of each distribution in a
                                                         `pip install --report` the list lacks
    python gpu_machine_packages.py copy-installed DIR    copy into DIR the distributions that
                                                         python has installed and the list lacks
                                                         (the closure of `missing`): the wheels'
                                                         contents, without a network
"""
import configparser
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIST = HERE / "gpu_machine_packages.txt"
SETUP_CFG = HERE.parent.parent / "setup.cfg"


def normalise(name: str) -> str:
    """A distribution's name as PEP 503 compares them: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_machine_packages() -> set:
    lines = LIST.read_text().splitlines()
    return {normalise(line) for line in lines if line.strip() and not line.startswith("#")}


def requirement_name(requirement: str) -> str:
    return normalise(re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group())


def missing_requirements() -> list:
    """setup.cfg's install_requires whose distribution the GPU machine lacks, extras dropped."""
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    have = gpu_machine_packages()
    requirements = [line.strip() for line in parser["options"]["install_requires"].splitlines()
                    if line.strip()]
    return [re.sub(r"\[.*?\]", "", r) for r in requirements if requirement_name(r) not in have]


def missing_pins(report_path) -> list:
    have = gpu_machine_packages()
    report = json.loads(Path(report_path).read_text())
    pins = [(normalise(item["metadata"]["name"]), item["metadata"]["version"])
            for item in report["install"]]
    return [f"{name}=={version}" for name, version in sorted(pins) if name not in have]


def installed_closure() -> list:
    """The distributions of :func:`missing_requirements` and everything they need (extras
    asked for included), as installed in this interpreter, less what the GPU machine has."""
    from importlib import metadata

    from packaging.requirements import Requirement

    have = gpu_machine_packages()
    todo = [(requirement_name(r), ()) for r in missing_requirements()]
    found = {}
    while todo:
        name, extras = todo.pop()
        if name in have or (name in found and set(extras) <= found[name][1]):
            continue
        distribution = metadata.distribution(name)
        found[name] = (distribution, set(extras) | (found[name][1] if name in found else set()))
        for text in distribution.requires or []:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((normalise(requirement.name), tuple(requirement.extras)))
    return [found[name][0] for name in sorted(found)]


def copy_installed(target) -> list:
    """Copy each distribution of :func:`installed_closure` (its files and metadata) into
    ``target``, as `pip install --target` would put its wheel there; returns the names."""
    import shutil

    target = Path(target)
    names = []
    for distribution in installed_closure():
        for file in distribution.files or []:
            source = Path(distribution.locate_file(file))
            if file.parts[0] == ".." or "__pycache__" in file.parts or not source.is_file():
                continue
            (target / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / file)
        names.append(f"{distribution.metadata['Name']}=={distribution.version}")
    return names


if __name__ == "__main__":
    command = sys.argv[1:2]
    if command == ["missing"]:
        print("\n".join(missing_requirements()))
    elif command == ["missing-pins"] and len(sys.argv) == 3:
        print("\n".join(missing_pins(sys.argv[2])))
    elif command == ["copy-installed"] and len(sys.argv) == 3:
        print(" ".join(copy_installed(sys.argv[2])))
    else:
        sys.exit(__doc__.split("\n\n")[-1])

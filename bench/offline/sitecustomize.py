"""The offline rehearsal of the GPU check: Python imports only what the GPU machine would have.

``bench/gpu_check.sh --rehearse`` puts this folder first on PYTHONPATH, so every Python process
of the run (section processes, decoding workers, ``cli.py train``) loads this at start-up. From
then on a top-level import that would come from this interpreter's site-packages fails unless
its distribution is in gpu_machine_packages.txt; anything else on sys.path (the standard
library, the project, the wheels' folder that ``--wheels`` puts on PYTHONPATH) imports as
usual. So PyAV, decord, zarr, numcodecs, donfig, google-crc32c and orjson come from the fetched
wheels or not at all, as on the GPU machine, and moto, pytest plugins and the rest of the
development venv stay out of reach.
"""
import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import site
import sys

from gpu_machine_packages import gpu_machine_packages, normalise


class GpuMachineOnly(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.allowed = gpu_machine_packages()
        folders = site.getsitepackages() + [site.getusersitepackages()]
        self.site_packages = tuple(os.path.realpath(f) + os.sep for f in folders)
        self.owners = None  # module -> distributions, read on the first site-packages import

    def find_spec(self, name, path=None, target=None):
        if path is not None:  # a submodule: its package was let through already
            return None
        spec = importlib.machinery.PathFinder.find_spec(name)
        location = spec and (spec.origin if spec.has_location else
                             next(iter(spec.submodule_search_locations or []), None))
        if not location or not os.path.realpath(location).startswith(self.site_packages):
            return None
        if self.owners is None:
            self.owners = importlib.metadata.packages_distributions()
        distributions = {normalise(d) for d in self.owners.get(name, [])}
        if not distributions or distributions & self.allowed:
            return None  # a bare module of the venv (_virtualenv), or one the machine has
        raise ModuleNotFoundError(
            f"No module named {name!r} (offline rehearsal: {', '.join(sorted(distributions))} "
            "is not on the GPU machine; bench/offline/gpu_machine_packages.txt)", name=name)


sys.meta_path.insert(0, GpuMachineOnly())

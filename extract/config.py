"""Extraction settings: one typed dataclass for everything a dataset preset or the flags set.

A preset (``configs/datasets/<name>.json``) is a JSON object of these keys, read by the same
loader as the training configs (``losa_tal.build_config``): a key not listed here, or a value of
the wrong type, is refused naming the file and the dotted key. The defaults below are the only
ones: a preset lists what differs from them, ``extract``'s help shows them. Torch-free, so a bad
preset is refused before any model code loads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from losa_tal import ConfigError, build_config, check_values, read_config_file, shipped_configs
from store.protocol import SamplingProtocol

PRESET_DIR = shipped_configs() / "datasets"
STORE_FORMATS = ("zarr", "hdf5")


@dataclass
class DownloadHints:
    """What to tell a user whose input is missing: where to get it (a preset says for its
    dataset; these generic hints otherwise)."""

    videos: str = "put the videos there or pass --videos DIR"
    checkpoint: str = "download it or pass --checkpoint PATH"
    annotations: str = "check the path given to --annotations"


@dataclass
class ExtractionConfig:
    description: str = ""  # one line: what the preset is for
    videos: str | None = None  # folder of video files (required)
    store: str | None = None  # feature store to create or resume; a .h5 path means HDF5
    annotations: str | None = None  # only the videos of this annotation file (JSON)
    subset: str | None = None  # only this subset of the annotations; None: every subset
    # A backbone preset name (vit_s|b|l|h|g) or a dict of VideoMAEv2 constructor arguments.
    backbone: str | dict = "vit_g"
    checkpoint: str | None = None  # VideoMAEv2 checkpoint (.pth); None: random weights
    random_init: bool = False  # random weights from ``seed`` are meant (no checkpoint needed)
    seed: int = 0  # of the random weights
    layers: list[int] = field(default_factory=list)  # intermediate blocks to store (0-based)
    tokens: list[int] = field(default_factory=lambda: [1, 1, 1])  # pooled grid t, h, w per clip
    batch_size: int = 32  # clips per backbone batch
    num_workers: int = 4  # decoding processes (0: decode in the main process)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    format: str | None = None  # zarr or hdf5 for a new store; None: by the store path
    protocol: SamplingProtocol = field(default_factory=SamplingProtocol)
    download: DownloadHints = field(default_factory=DownloadHints)

    def check(self):
        parse_tokens(self.tokens)
        check_values([
            ("batch_size", self.batch_size >= 1, "positive", self.batch_size),
            ("num_workers", self.num_workers >= 0, "zero or more", self.num_workers),
            ("format", self.format in (None, *STORE_FORMATS),
             f"one of {', '.join(STORE_FORMATS)} or null", self.format),
        ])


def load_preset(name: str) -> ExtractionConfig:
    """The dataset preset ``configs/datasets/<name>.json``, checked."""
    path = PRESET_DIR / f"{name}.json"
    return build_config(ExtractionConfig, read_config_file(path), str(path))


def parse_tokens(text: str | tuple | list) -> tuple[int, int, int]:
    """``"2x1x1"`` (or a 3-sequence) -> (t, h, w); a single number n means (n, 1, 1)."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+)\s*x\s*(\d+)\s*)?", str(text))
        if not match:
            raise ConfigError("tokens", f"expected a grid like 2x1x1, got {text!r}")
        parts = [int(g) if g else 1 for g in match.groups()]
    if len(parts) != 3 or not all(isinstance(p, int) and p >= 1 for p in parts):
        raise ConfigError("tokens", f"expected three positive integers t x h x w, got "
                          f"{text!r}")
    return tuple(parts)

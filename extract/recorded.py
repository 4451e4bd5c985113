"""The extraction settings a feature store records, so that a store says how to extend it.

``extract --out EXISTING`` takes every setting the store records (backbone, checkpoint or
random-weight seed, layers, tokens, sampling protocol); a value given explicitly (a flag,
``--set``, the preset, ``--like``) that differs is refused before any model is built, naming
each field and both values. ``extract --like STORE`` starts from another store's settings, and
``detect`` from those of the store a run was trained on (its checkpoint's store signature).
Torch-free: a contradiction is refused in a fraction of a second.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from extract.config import ExtractionConfig
from losa_tal import input_error
from store.protocol import SamplingProtocol

# The ExtractionConfig keys a store decides.
RECORDED_KEYS = ("backbone", "checkpoint", "seed", "layers", "tokens", "protocol")


@dataclasses.dataclass
class Recorded:
    """How a store's features were made, read from its root metadata (or a run's signature of
    it: the same backbone and protocol records, the layers the run reads)."""

    where: str  # the store (or run), for messages
    backbone: dict  # every constructor argument
    preset: str | None  # the backbone preset those arguments started from
    checkpoint: dict | None  # {"file", "sha256"}; None: random weights
    checkpoint_path: str | None  # where the checkpoint was when the store was created
    seed: int | None  # of the random weights
    layers: list
    tokens: list | None
    protocol: SamplingProtocol

    @classmethod
    def from_meta(cls, meta: dict, where: str) -> "Recorded":
        backbone = meta["backbone"]
        return cls(where=str(where), backbone=dict(backbone["kwargs"]),
                   preset=backbone.get("preset"), checkpoint=backbone.get("checkpoint"),
                   checkpoint_path=meta.get("checkpoint_path"),
                   seed=backbone.get("random_init_seed"), layers=list(meta["layers"]),
                   tokens=meta["tokens"], protocol=SamplingProtocol.from_dict(meta["protocol"]))

    def random_weights(self) -> bool:
        return self.checkpoint is None

    def backbone_spec(self) -> dict:
        """The backbone to build: the recorded arguments under the recorded preset's name, so
        that the new store records the same backbone."""
        return {"preset": self.preset, **self.backbone}


def existing_store(path, storage_options=None) -> Recorded | None:
    """The settings of the store at ``path``; None where there is none yet (a URL that cannot be
    opened counts as none: creating it then says what is wrong)."""
    from losa_tal import InputError
    from store import FeatureStore
    from store.urls import is_url

    path = str(path)
    if not is_url(path) and (not os.path.exists(path) or
                             (os.path.isdir(path) and not os.listdir(path))):
        return None
    try:
        store = FeatureStore.open(path, storage_options)
    except InputError:
        if is_url(path):
            return None
        raise
    with store:
        return Recorded.from_meta(store.meta, path)


def taken_from(recorded: Recorded, config: ExtractionConfig, explicit) -> ExtractionConfig:
    """``config`` with every recorded setting that is not in ``explicit`` (dotted keys given by
    a flag, --set, a preset) replaced by the store's."""
    explicit = set(explicit)
    protocol = {name: value for name, value in dataclasses.asdict(recorded.protocol).items()
                if not _given(f"protocol.{name}", explicit)}
    values = {"protocol": dataclasses.replace(config.protocol, **protocol)}
    if "backbone" not in explicit:
        values["backbone"] = recorded.backbone_spec()
    if "layers" not in explicit:
        values["layers"] = list(recorded.layers)
    if "tokens" not in explicit and recorded.tokens is not None:
        values["tokens"] = list(recorded.tokens)
    if "checkpoint" not in explicit:
        values["checkpoint"] = recorded.checkpoint_path if recorded.checkpoint else None
    if "seed" not in explicit and recorded.random_weights():
        values["seed"] = recorded.seed
    return dataclasses.replace(config, **values)


def contradictions(recorded: Recorded, config: ExtractionConfig, origins: dict) -> list[str]:
    """Each recorded setting that ``config`` sets otherwise by an explicit source (``origins``:
    dotted key -> the flag, --set or file that gave it), as ``field (store: X, source: Y)``."""
    found = []

    def differ(key, stored, given, source):
        if stored != given:
            found.append(f"{key} ({recorded.where}: {_shown(stored)}, {source}: {_shown(given)})")

    for key, source in origins.items():
        if key == "protocol" or key.startswith("protocol."):
            names = [key.partition(".")[2]] if "." in key else \
                [f.name for f in dataclasses.fields(SamplingProtocol)]
            for name in names:
                differ(f"protocol.{name}", getattr(recorded.protocol, name, None),
                       getattr(config.protocol, name, None), source)
        elif key == "backbone":
            found += _backbone_contradictions(recorded, config.backbone, source)
        elif key == "layers":
            differ("layers", recorded.layers, _block_indices(config.layers, recorded), source)
        elif key == "tokens" and recorded.layers:
            differ("tokens", recorded.tokens, list(config.tokens), source)
        elif key == "checkpoint" and config.checkpoint is not None:
            stored = recorded.checkpoint["file"] if recorded.checkpoint else "random weights"
            differ("checkpoint", stored, Path(config.checkpoint).name, source)
        elif key == "seed" and recorded.random_weights():
            differ("seed", recorded.seed, config.seed, source)
    return found


def refuse_contradictions(recorded: Recorded, config: ExtractionConfig, origins: dict,
                          random_init: bool) -> None:
    """InputError naming every setting given otherwise than the store records."""
    found = contradictions(recorded, config, origins)
    if random_init and not recorded.random_weights():
        found.append(f"checkpoint ({recorded.where}: {recorded.checkpoint['file']}, "
                     f"{origins.get('checkpoint', '--random-init')}: random weights)")
    if found:
        raise input_error(recorded.where, "was extracted with other settings: " +
                          "; ".join(found) + "; leave these out to take the store's, or "
                          "extract into a new store")


def checkpoint_for(recorded: Recorded, config: ExtractionConfig) -> None:
    """Refuse a recorded checkpoint that has moved, asking for its new place."""
    if recorded.checkpoint and not (config.checkpoint and Path(config.checkpoint).is_file()):
        where = f" (recorded at {recorded.checkpoint_path}, not there now)" \
            if recorded.checkpoint_path else ""
        raise input_error(recorded.where, f"was extracted with the checkpoint "
                          f"{recorded.checkpoint['file']}{where}; give its path with "
                          "`checkpoint`")


def _backbone_contradictions(recorded: Recorded, spec, source) -> list[str]:
    spec = {"preset": spec} if isinstance(spec, str) else dict(spec)
    found = []
    for name, value in sorted(spec.items()):
        stored = recorded.preset if name == "preset" else recorded.backbone.get(name)
        if stored != value:
            found.append(f"backbone.{name} ({recorded.where}: {_shown(stored)}, {source}: "
                         f"{_shown(value)})")
    return found


def _block_indices(layers, recorded: Recorded) -> list:
    """Negative block indices counted from the recorded backbone's depth, as the store did."""
    depth = recorded.backbone.get("depth")
    return [layer + depth if layer < 0 and isinstance(depth, int) else layer
            for layer in layers]


def _given(key: str, explicit: set) -> bool:
    return key in explicit or key.partition(".")[0] in explicit


def _shown(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value

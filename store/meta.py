"""The store's self-description: root metadata, per-video records, and how layers are named.

Root metadata (``fs.meta``) is plain JSON, checked twice: as a programming contract when a writer
creates a store (``ValueError``), and as untrusted input when any store is opened
(``InputError`` naming the store): a store copied from a colleague may have been edited by hand.
"""
from __future__ import annotations

import datetime
import json
import math

from losa_tal import __version__, input_error

# Layout versions, decided by each backend: Zarr stores are written as 2 (commit records, many
# machines) and still read as 1; HDF5 stores are 1.
FORMAT_VERSIONS = (1, 2)
LAST = "last"
DTYPES = ("float16", "float32")
# What must agree before a writer may append to an existing store.
COMPARED_KEYS = ("backbone", "protocol", "layers", "tokens", "feature_dim", "dtype")
REQUIRED_KEYS = ("format_version", "backbone", "protocol", "layers", "tokens", "feature_dim",
                 "dtype")
# Per-video attributes the store writes itself; a caller's info may not set them.
RESERVED_INFO_KEYS = ("video_id", "num_clips", "float32_layers", "complete")
TIMES_KEY = "times"


def array_key(layer) -> str:
    """Name of a layer's array inside a video group: ``last`` or ``layer_<block index>``."""
    return LAST if layer == LAST else f"layer_{layer}"


def json_normal(value):
    """The value as it will read back from JSON (tuples become lists, numpy scalars plain)."""
    return json.loads(json.dumps(value, default=_plain, allow_nan=False))


def _plain(value):
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def new_meta(meta: dict) -> dict:
    """A writer's metadata, completed with what the store records itself; ValueError if bad."""
    if not isinstance(meta, dict):
        raise ValueError(f"store metadata must be a dict, got {type(meta).__name__}")
    try:
        full = json_normal({"dtype": "float16", **meta})
    except (TypeError, ValueError) as err:
        raise ValueError(f"store metadata is not JSON-serialisable: {err}") from None
    full.setdefault("format_version", FORMAT_VERSIONS[0])
    full.setdefault("software_version", __version__)
    full.setdefault("created", datetime.datetime.now(datetime.timezone.utc)
                    .isoformat(timespec="seconds"))
    problems = meta_problems(full)
    if problems:
        raise ValueError("store metadata: " + "; ".join(problems))
    return full


def checked_meta(store_path, meta, versions=FORMAT_VERSIONS) -> dict:
    """Root metadata read from a store, refused with an InputError if it cannot be right."""
    if not isinstance(meta, dict):
        raise input_error(store_path, "root metadata is not a JSON object")
    version = meta.get("format_version")
    if version not in versions:
        raise input_error(store_path, f"format_version {version!r} is not supported "
                          f"(this software reads version {' or '.join(map(str, versions))})")
    problems = meta_problems(meta)
    if problems:
        raise input_error(store_path, "root metadata: " + "; ".join(problems))
    return meta


def meta_problems(meta: dict) -> list[str]:
    """Everything wrong with a root metadata dict (empty when it is well formed)."""
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        return [f"missing {', '.join(missing)}"]
    problems = []
    layers, tokens = meta["layers"], meta["tokens"]
    if not (isinstance(layers, list) and all(_is_count(x, minimum=0) for x in layers)
            and len(set(layers)) == len(layers)):
        problems.append(f"layers must be a list of distinct block indices, got {layers!r}")
    if tokens is None:
        if layers:
            problems.append("tokens must be [t, h, w] when intermediate layers are stored")
    elif not (isinstance(tokens, list) and len(tokens) == 3 and all(_is_count(x) for x in tokens)):
        problems.append(f"tokens must be [t, h, w] positive integers, got {tokens!r}")
    if not _is_count(meta["feature_dim"]):
        problems.append(f"feature_dim must be a positive integer, got {meta['feature_dim']!r}")
    if meta["dtype"] not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {meta['dtype']!r}")
    for key in ("backbone", "protocol"):
        if not isinstance(meta[key], dict):
            problems.append(f"{key} must be an object")
    return problems


def meta_differences(stored: dict, requested: dict, keys=COMPARED_KEYS,
                     names=("store", "requested")) -> list[str]:
    """Each of ``keys`` (dotted down to the leaf) whose value differs, with both values, each
    after its side's name: ``protocol.fps (store: 15.0, requested: null)``."""
    differences = []
    for key in keys:
        differences += _leaf_differences(key, stored.get(key), requested.get(key), names)
    return differences


def _leaf_differences(where, stored, requested, names) -> list[str]:
    if isinstance(stored, dict) and isinstance(requested, dict):
        return [diff for key in sorted(set(stored) | set(requested))
                for diff in _leaf_differences(f"{where}.{key}", stored.get(key),
                                              requested.get(key), names)]
    if stored == requested:
        return []
    return [f"{where} ({names[0]}: {json.dumps(stored)}, {names[1]}: {json.dumps(requested)})"]


def video_record_problems(record, layer_names) -> list[str]:
    """What is wrong with a video's stored attributes (written by the store, so should be none)."""
    problems = []
    if not _is_count(record.get("num_clips")):
        problems.append(f"num_clips {record.get('num_clips')!r} is not a positive integer")
    fps = record.get("fps")
    if fps is not None and not _is_positive_number(fps):
        problems.append(f"fps {fps!r} is not a positive number")
    duration = record.get("duration")
    if duration is not None and not (_is_number(duration) and duration >= 0):
        problems.append(f"duration {duration!r} is not a non-negative number")
    promoted = record.get("float32_layers", [])
    if not (isinstance(promoted, list) and all(name in layer_names for name in promoted)):
        problems.append(f"float32_layers {promoted!r} names layers the store does not hold")
    return problems


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_number(value) -> bool:
    return _is_number(value) and value > 0


def _is_count(value, minimum=1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

"""Reading the JSON inputs and writing outputs without ever leaving half a file behind."""
import gc
import json
import os
import warnings
from contextlib import contextmanager

import orjson

from losa_tal import TOO_DEEP, input_error, output_errors, write_output


def read_json_object(source, what: str, warn_duplicate_keys: bool = False):
    """Return ``(name, dict)`` for a JSON file path or an already-loaded dict.

    ``name`` is what error messages call the input: the path, or ``<what>`` for a dict. With
    ``warn_duplicate_keys`` a key given twice in one object (a video id in an annotation file,
    where the last one would silently win) is a warning naming it; this parses with the
    standard parser, so it is for files of modest size.
    """
    if isinstance(source, dict):
        return f"<{what}>", source
    name = os.fspath(source)
    try:
        with open(name, "rb") as file:
            text = file.read()
        if warn_duplicate_keys:
            data = json.loads(text, object_pairs_hook=_DuplicateKeys(name))
        else:
            data = parse_json(text)
    except FileNotFoundError:
        raise input_error(name, "no such file") from None
    except IsADirectoryError:
        raise input_error(name, "is a directory, expected a JSON file") from None
    except PermissionError:
        raise input_error(name, "permission denied") from None
    except json.JSONDecodeError as err:
        raise input_error(name, f"not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise input_error(name, "not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise input_error(name, f"not valid JSON ({TOO_DEEP})") from None
    if not isinstance(data, dict):
        raise input_error(name, f"expected a JSON object, found {type(data).__name__}")
    return name, data


class _DuplicateKeys:
    """``object_pairs_hook`` that builds each object as ``json`` does (the last value of a key
    wins) and warns once per key given twice."""

    def __init__(self, name):
        self.name, self.warned = name, set()

    def __call__(self, pairs):
        data = dict(pairs)
        if len(data) < len(pairs):
            seen = set()
            for key, _ in pairs:
                if key in seen and key not in self.warned:
                    self.warned.add(key)
                    warnings.warn(f"{self.name}: key {key!r} appears more than once in one "
                                  "object; only its last value is used", stacklevel=2)
                seen.add(key)
        return data


def parse_json(text: bytes):
    """Parse JSON with orjson, 2.5x faster than the standard parser on a large predictions file.

    Whatever orjson refuses goes to the standard parser, so what we accept (NaN, Infinity, 1e400,
    lone surrogates, UTF-16) and the error messages stay those of ``json``. (orjson reads
    integers beyond 64 bits as floats; nothing here needs them exact.)
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


@contextmanager
def cyclic_gc_paused():
    """Pause the cyclic garbage collector while a large JSON file is parsed and converted.

    JSON makes no reference cycles, but its 10^6 new dicts, lists and floats trigger the
    collector over and over, each time re-scanning the growing tree: a quarter of the CPU time
    of ``evaluate`` on 200,000 detections. Use it around a function whose parsed tree is freed
    before the block ends, so that nothing is left for the collector to scan afterwards, or
    (``fuse``) around building a large output that one later collection scans once.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def require_key(name: str, data: dict, key: str, kind=dict):
    """``data[key]``, which must exist and be of ``kind``; the error names the file."""
    if key not in data:
        raise input_error(name, f"'{key}' is missing")
    value = data[key]
    if not isinstance(value, kind):
        raise input_error(name, f"'{key}' must be a JSON {_json_kind(kind)}")
    return value


def _json_kind(kind) -> str:
    return {dict: "object", list: "array", str: "string"}.get(kind, kind.__name__)


def write_json_atomic(path, data, compact=False, durable=False) -> None:
    """Write JSON to ``path`` through :func:`losa_tal.open_output` (never half a file); a
    failure is one line naming it.

    ``compact``: one line, written by orjson (a tenth of a second for 400,000 detections,
    where ``json.dumps`` takes more than half a second); finite numbers and string keys only.
    ``durable``: predictions, not a report one re-runs in seconds.
    """
    text = orjson.dumps(data) if compact else json.dumps(data, indent=2).encode()
    with output_errors(path):
        write_output(path, text + b"\n", durable)

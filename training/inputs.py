"""Opening what training and inference read: the feature store, the annotations, a subset."""
from __future__ import annotations

from pathlib import Path

from losa_tal import input_error


def open_store(path, dataset: str, storage_options: dict | None = None):
    """Open a feature store (a path or an fsspec URL) for reading; a missing one says how to
    make it: with the extraction preset ``dataset`` where there is one."""
    from extract.config import PRESET_DIR
    from store import FeatureStore
    from store.urls import is_url

    if not is_url(str(path)) and not Path(path).exists():
        make = f"losa-tal extract --preset {dataset}" if (PRESET_DIR / f"{dataset}.json") \
            .is_file() else "losa-tal extract"
        raise input_error(path, f"feature store not found; make it with `{make}` first (or "
                          "pass `store_path`)")
    return FeatureStore.open(path, storage_options)


def input_record(path) -> dict:
    """What a run records of one input: the path as given, and absolute (a URL as it is), so
    that a later command finds it from another working directory too."""
    from store.urls import is_url

    path = str(path)
    return {"given": path, "absolute": path if is_url(path) else str(Path(path).absolute())}


def recorded_input(record: dict | None, fallback: str) -> str:
    """The path a run recorded (``input_record``): its absolute form where that exists, else as
    given (a checkout that moved, run from its new root); ``fallback`` for a run without a
    record (one converted from another codebase)."""
    from store.urls import is_url

    if not record:
        return fallback
    absolute = record["absolute"]
    if is_url(absolute) or Path(absolute).exists() or not Path(record["given"]).exists():
        return absolute
    return record["given"]


def open_annotations(path):
    from evaluation import load_annotations

    return load_annotations(path)


def resolve_subset(annotations, subset: str | None, train: bool) -> str:
    """The subset name as written in the file; None picks the file's conventional split."""
    if subset is not None:
        return annotations.resolve_subset(subset)
    found = annotations.train_subset if train else annotations.test_subset
    if found is None:
        key = "data.train_subset" if train else "eval.subset"
        raise input_error(annotations.name, f"cannot tell which subset to use; set {key} "
                          f"(subsets: {', '.join(annotations.subsets)})")
    return found

"""Opening what training and inference read: the feature store, the annotations, a subset."""
from __future__ import annotations

from pathlib import Path

from losa_tal import input_error


def open_store(path, dataset: str, storage_options: dict | None = None):
    """Open a feature store (a path or an fsspec URL) for reading; a missing one says how to
    make it."""
    from store import FeatureStore
    from store.urls import is_url

    if not is_url(str(path)) and not Path(path).exists():
        raise input_error(path, f"feature store not found; run `make extract DATASET={dataset}` "
                          "first (or pass `store_path`)")
    return FeatureStore.open(path, storage_options)


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

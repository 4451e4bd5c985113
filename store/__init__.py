"""The feature store: stage one's cache of backbone features, shared read-only across a lab.

``from store import FeatureStore, LAST``; see docs/store.md. ``FeatureStore`` is imported on first
use so that ``python cli.py store --help`` does not pay for numpy, zarr and h5py.
"""
from .meta import LAST

__all__ = ["FeatureStore", "LAST"]


def __getattr__(name):
    if name == "FeatureStore":
        from .feature_store import FeatureStore

        return FeatureStore
    raise AttributeError(f"module 'store' has no attribute {name!r}")

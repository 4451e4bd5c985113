"""LoSA adapters: long- and short-range cross-attention over cached backbone layers, gated fusion.

Names load on first use (PEP 562), so ``import adapt.config`` does not import torch.
"""
from losa_tal import lazy_attributes

_HOMES = {"LoSA": "adapt.losa", "count_trainable_parameters": "adapt.losa",
          "LosaConfig": "adapt.config", "losa_parameter_count": "adapt.config"}
__all__ = sorted(_HOMES)

__getattr__ = lazy_attributes(__name__, _HOMES)

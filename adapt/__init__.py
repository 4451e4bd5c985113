"""LoSA adapters: long- and short-range cross-attention over cached backbone layers, gated fusion."""
from adapt.losa import LoSA, count_trainable_parameters, losa_parameter_count

__all__ = ["LoSA", "count_trainable_parameters", "losa_parameter_count"]

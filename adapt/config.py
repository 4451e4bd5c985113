"""LoSA's settings: the one place their defaults and ranges live (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass

from losa_tal import ConfigError, check_positive_integers, check_values

# Which adapters each layer runs (the ``adapters`` argument): LoSA is "both"; the single-range
# variants exist for the ablation (bench/ablate.py), to see what each range adds.
ADAPTER_RANGES = {"both": ("short", "long"), "short": ("short",), "long": ("long",)}
ZERO_INIT_SIDES = ("fuse", "gates")


@dataclass
class LosaConfig:
    """``adapt.LoSA`` constructor arguments other than the shapes read from the store (their
    meaning: the class docstring in adapt/losa.py)."""

    bottleneck: int = 256
    num_heads: int = 4
    short_window: int = 9  # clips around each clip that its short-range adapter attends to
    long_window: int | None = None  # None: global attention over the window/video
    dropout: float = 0.1
    checkpoint_layers: bool = False  # recompute adapter activations in backward (saves memory)
    zero_init: str = "fuse"  # "fuse" or "gates": which side of the fusion starts at zero
    adapters: str = "both"  # "both" (LoSA), "short" or "long": one range only, for ablations
    long_relative_bias: bool = False  # learned per-offset bias in the long-range band

    def check(self) -> None:
        check_positive_integers(bottleneck=self.bottleneck, num_heads=self.num_heads)
        check_values([
            ("bottleneck", self.bottleneck % self.num_heads == 0,
             f"divisible by num_heads {self.num_heads}", self.bottleneck),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)", self.dropout),  # False for NaN
            ("zero_init", self.zero_init in ZERO_INIT_SIDES,
             " or ".join(map(repr, ZERO_INIT_SIDES)), self.zero_init),
            ("adapters", self.adapters in ADAPTER_RANGES,
             f"one of {', '.join(map(repr, ADAPTER_RANGES))}", self.adapters),
            *((name, window is None or (window >= 1 and window % 2 == 1),
               "a positive odd number of clips", window)
              for name, window in (("short_window", self.short_window),
                                   ("long_window", self.long_window))),
        ])
        if self.long_relative_bias and self.long_window is None:
            raise ConfigError("long_relative_bias", "needs a long_window (a band of offsets)")


def losa_parameter_count(dim: int, num_layers: int, num_tokens: int, **losa_kwargs) -> int:
    """Trainable parameters of ``LoSA(dim, num_layers, num_tokens, **losa_kwargs)``, worked
    out from its layer shapes without building it (tests/test_losa.py checks it)."""
    config = LosaConfig(**losa_kwargs)
    d = config.bottleneck
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    cross = 2 * dim + linear(dim, d) + 3 * linear(d, d)
    adapter = {"short": cross + num_tokens * d + linear(num_tokens * d, d),
               "long": cross + (config.num_heads * config.long_window
                                if config.long_relative_bias else 0)}
    ranges = ADAPTER_RANGES[config.adapters]
    per_layer = sum(adapter[name] for name in ranges) + len(ranges) * d
    return 2 * dim + linear(dim, d) + num_layers * per_layer + d * dim

"""LoSA: long- and short-range adapters over cached intermediate backbone features.

LoSA (Gupta et al., WACV 2025) adapts a frozen video backbone for temporal action localisation
without back-propagating through it. For each chosen intermediate layer i it runs two
cross-attention adapters whose Key/Value are the last-layer features of the video:

* short-range: Query = the K pooled spatio-temporal tokens of each clip at layer i, Key/Value =
  the last-layer features of the clips in a short window around that clip; the K outputs are
  pooled by a learned projection of their concatenation into one vector per clip. (A plain
  mean would throw away which token said what: the mean of K projected queries is the
  projection of their mean, so e.g. the order of a clip's early and late halves would be lost.)
* long-range: Query = layer i's clip sequence (tokens averaged), Key/Value = the last-layer
  sequence over a long window or the whole (padded) sequence.

A learnable gate scales each adapter's output per channel; the gated sum goes through one
projection and is added to the last-layer sequence. That projection starts at zero (the gates at
one), so at initialisation the output *is* the last-layer sequence, bit for bit: LoSA starts as
the head-only baseline. Zero gates with a random projection would start there too, but that is a
saddle: the projection gets no gradient until the gates grow, and the gates' gradient is a
random projection of the head's. On the demo benchmark the gates were still at about 0.01 after
300 steps and LoSA stayed within noise of head-only; a zero projection learns from step one,
as a LoRA up-projection does. The price: when the intermediate layers carry nothing useful, the
projection lets their noise in sooner and the head needs longer to fit (``zero_init="gates"``
keeps the slower start).

Everything runs in a bottleneck width ``d``: the last-layer features are normalised and projected
to ``d`` once (shared "memory"), each adapter projects its own query to ``d`` and attends there.
The projected query is also the adapter's residual stream, so the intermediate layer's own
information reaches the output and not only a mixture of last-layer values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from adapt.config import ADAPTER_RANGES, LosaConfig
from losa_tal import check_positive_integers, checked_config, config_arguments

DEFAULT = LosaConfig()  # the constructor's defaults (written once, in adapt/config.py)


class BottleneckCrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention in width ``bottleneck`` with a residual from the query.

    query [N, Q, dim] (backbone width), memory [N, M, bottleneck] (already normalised and
    projected), allowed [N, Q or 1, M] bool (True = may attend) -> [N, Q, bottleneck].
    """

    def __init__(self, dim: int, bottleneck: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if bottleneck % num_heads:
            raise ValueError(f"bottleneck {bottleneck} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.query_norm = nn.LayerNorm(dim)
        self.query_down = nn.Linear(dim, bottleneck)
        self.key = nn.Linear(bottleneck, bottleneck)
        self.value = nn.Linear(bottleneck, bottleneck)
        self.out = nn.Linear(bottleneck, bottleneck)

    def project_query(self, tokens: torch.Tensor, pool_tokens: bool = False) -> torch.Tensor:
        """LayerNorm + projection of the query tokens [..., K, dim] (averaged over K first if
        ``pool_tokens``) to the bottleneck width.

        The normalised [B, T, K, dim] query is the largest activation of an adapter, and
        recomputing it costs one projection: it is recomputed in backward, not stored.
        """
        return recompute_in_backward(self._project_query, tokens, pool_tokens)

    def _project_query(self, tokens, pool_tokens):
        if pool_tokens:
            tokens = tokens.mean(dim=-2)
        return self.query_down(self.query_norm(tokens))

    def keys_values(self, memory: torch.Tensor):
        return self.key(memory), self.value(memory)

    def attend(self, q, keys, values, allowed, bias=None) -> torch.Tensor:
        """Projected queries q [N, Q, d] attend to keys/values [N, M, d]; returns q + attention.

        ``bias`` [heads, Q, M], if given, is added to the attention logits where allowed.
        """
        heads = lambda x: x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # noqa: E731
        mask = allowed.unsqueeze(1)
        if bias is not None:
            mask = torch.where(mask, bias.to(q.dtype), torch.finfo(q.dtype).min)
        attended = F.scaled_dot_product_attention(
            heads(q), heads(keys), heads(values),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return q + self.out(attended.transpose(1, 2).flatten(2))


class ShortRangeAdapter(nn.Module):
    """Each clip's K tokens at one layer attend to the last-layer features of nearby clips."""

    def __init__(self, dim, bottleneck, num_heads, num_tokens, window, dropout=0.0):
        super().__init__()
        self.radius = window // 2
        self.cross = BottleneckCrossAttention(dim, bottleneck, num_heads, dropout)
        # Tells the attention which token of the pooled grid a query came from.
        self.token_embed = nn.Parameter(torch.zeros(num_tokens, bottleneck))
        nn.init.trunc_normal_(self.token_embed, std=0.02)
        # One vector per clip from its K token outputs, keeping which token said what.
        self.token_pool = nn.Linear(num_tokens * bottleneck, bottleneck)

    def forward(self, tokens, memory, mask):
        """tokens [B, T, K, D], memory [B, T, d], mask [B, T] -> [B, T, d]."""
        q = self.cross.project_query(tokens) + self.token_embed
        # Project once per clip, then gather windows: a W-fold smaller matmul. The gathered
        # windows are W times the size of the keys and values, so they are recomputed too.
        keys, values = self.cross.keys_values(memory)
        out = recompute_in_backward(self._attend_windows, q, keys, values, mask)
        return self.token_pool(out.flatten(2))

    def _attend_windows(self, q, keys, values, mask):
        """q [B, T, K, d] attends to the keys/values [B, T, d] of the clips around its own."""
        batch, length = mask.shape
        windows = lambda x: sliding_windows(x, self.radius).flatten(0, 1)  # noqa: E731
        allowed = sliding_windows(mask, self.radius, pad_value=False)    # [B, T, W]
        # A padded clip may see no valid key at all; let it attend anywhere (its output is
        # discarded) rather than produce NaN from an empty softmax.
        allowed = allowed | ~mask.unsqueeze(-1)
        out = self.cross.attend(q.flatten(0, 1), windows(keys), windows(values),
                                allowed.flatten(0, 1).unsqueeze(1))
        return out.unflatten(0, (batch, length))


class LongRangeAdapter(nn.Module):
    """One layer's clip sequence attends to the last-layer sequence, globally or in a band.

    Attention by content alone cannot tell a key 5 s *before* the query from one 5 s after, or
    from one in another part of the window. ``relative_bias`` (band only) adds a learned logit
    per head and offset (key step - query step), starting at zero, so the adapter can learn
    *where* to look as well as what for (as Swin's or T5's relative position bias does).
    """

    def __init__(self, dim, bottleneck, num_heads, window=None, dropout=0.0,
                 relative_bias=False):
        super().__init__()
        self.radius = None if window is None else window // 2
        self.cross = BottleneckCrossAttention(dim, bottleneck, num_heads, dropout)
        self.relative_bias = None
        if relative_bias:
            if window is None:
                raise ValueError("long_relative_bias needs a long_window (a band of offsets)")
            self.relative_bias = nn.Parameter(torch.zeros(num_heads, 2 * self.radius + 1))

    def forward(self, tokens, memory, mask):
        """tokens [B, T, K, D], memory [B, T, d], mask [B, T] -> [B, T, d]."""
        q = self.cross.project_query(tokens, pool_tokens=True)
        keys, values = self.cross.keys_values(memory)
        if self.radius is None:
            # Key mask only, [B, 1, T], so attention kernels broadcast it over queries. A video
            # with no valid step at all may attend anywhere (its output is discarded).
            allowed = (mask | ~mask.any(dim=1, keepdim=True)).unsqueeze(1)
            return self.cross.attend(q, keys, values, allowed)
        positions = torch.arange(mask.shape[1], device=mask.device)
        offsets = positions[None, :] - positions[:, None]                # key - query, [T, T]
        band = offsets.abs() <= self.radius
        allowed = (mask.unsqueeze(1) & band) | ~mask.unsqueeze(-1)  # see ShortRangeAdapter
        bias = None
        if self.relative_bias is not None:
            bias = self.relative_bias[:, offsets.clamp(-self.radius, self.radius) + self.radius]
        return self.cross.attend(q, keys, values, allowed, bias)


def recompute_in_backward(function, *args):
    """function(*args), keeping only its inputs for backward (activation checkpointing)."""
    if torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def sliding_windows(x: torch.Tensor, radius: int, pad_value=0.0) -> torch.Tensor:
    """x [B, T, ...] -> [B, T, 2*radius+1, ...]: entry [b, t, j] is x[b, t - radius + j].

    Positions outside the sequence hold ``pad_value``. The result is a strided view of one
    padded copy, so it costs no memory until something reshapes it.
    """
    pad = x.new_full((x.shape[0], radius, *x.shape[2:]), pad_value)
    padded = torch.cat([pad, x, pad], dim=1)
    windows = padded.unfold(1, 2 * radius + 1, 1)                      # [B, T, ..., W]
    return windows.movedim(-1, 2)


class LoSA(nn.Module):
    """Long-short-range adapters with gated fusion; see the module docstring.

    Args:
        dim: backbone width D (1408 for ViT-g).
        num_layers: number L of intermediate layers fed in ``inter``.
        num_tokens: pooled tokens K per clip and layer in ``inter``.
        bottleneck: width d in which the adapters attend (query/key/value and output).
        num_heads: attention heads of every adapter (must divide ``bottleneck``).
        short_window: clips seen by the short-range adapter, centred on the query clip (odd).
        long_window: clips seen by the long-range adapter (odd), or None for the whole sequence.
        dropout: attention dropout and dropout on each adapter's output before its gate.
        checkpoint_layers: recompute each layer's adapters in the backward pass instead of
            storing their activations (saves about L * B*T*K*D activation elements).
        zero_init: which side of the gated fusion starts at zero, so that LoSA starts as the
            head-only model: "fuse" (the projection, gates at one; learns from step one) or
            "gates" (a random projection; slower to open, but gentler when the intermediate
            layers carry little, see docs/losa.md).
        adapters: "both" (LoSA), or "short" / "long" for one range only (an ablation).
        long_relative_bias: a learned bias per head and offset in the long-range attention
            (needs ``long_window``; see LongRangeAdapter and docs/losa.md).

    forward(last [B, T, D], inter [B, L, T, K, D], mask [B, T] bool, True = valid) -> [B, T, D].
    Output at padded steps equals ``last``.
    """

    @classmethod
    def from_config(cls, dim: int, num_layers: int, num_tokens: int, config: LosaConfig) -> "LoSA":
        """The adapters a ``LosaConfig`` describes, for a store's layout."""
        return cls(dim, num_layers, num_tokens, **config_arguments(config))

    def __init__(
        self,
        dim: int,
        num_layers: int,
        num_tokens: int,
        bottleneck: int = DEFAULT.bottleneck,
        num_heads: int = DEFAULT.num_heads,
        short_window: int = DEFAULT.short_window,
        long_window: int | None = DEFAULT.long_window,
        dropout: float = DEFAULT.dropout,
        checkpoint_layers: bool = DEFAULT.checkpoint_layers,
        zero_init: str = DEFAULT.zero_init,
        adapters: str = DEFAULT.adapters,
        long_relative_bias: bool = DEFAULT.long_relative_bias,
    ):
        super().__init__()
        # Values come from user configs: refuse them by name (ConfigError, a ValueError).
        check_positive_integers(dim=dim, num_layers=num_layers, num_tokens=num_tokens)
        checked_config(LosaConfig, locals())
        self.num_layers = num_layers
        self.num_tokens = num_tokens
        self.checkpoint_layers = checkpoint_layers
        self.memory_norm = nn.LayerNorm(dim)
        self.memory_down = nn.Linear(dim, bottleneck)
        self.ranges = ADAPTER_RANGES[adapters]
        build = {"short": lambda: ShortRangeAdapter(dim, bottleneck, num_heads, num_tokens,
                                                    short_window, dropout),
                 "long": lambda: LongRangeAdapter(dim, bottleneck, num_heads, long_window,
                                                  dropout, long_relative_bias)}
        for name in self.ranges:
            setattr(self, name, nn.ModuleList(build[name]() for _ in range(num_layers)))
        self.output_dropout = nn.Dropout(dropout)
        # Per-channel gates, [range (short, long), layer, d], and a projection without bias: one
        # of them starts at zero, so LoSA starts as the head-only model (module docstring: which).
        self.gates = nn.Parameter(torch.ones(len(self.ranges), num_layers, bottleneck))
        self.fuse = nn.Linear(bottleneck, dim, bias=False)
        if zero_init == "fuse":
            nn.init.zeros_(self.fuse.weight)
        else:
            nn.init.zeros_(self.gates)

    def forward(self, last: torch.Tensor, inter: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check_shapes(last, inter, mask)
        memory = self.memory_down(self.memory_norm(last))
        gated = None
        for i in range(self.num_layers):
            if self.checkpoint_layers:
                layer_out = recompute_in_backward(self._layer, i, inter[:, i], memory, mask)
            else:
                layer_out = self._layer(i, inter[:, i], memory, mask)
            gated = layer_out if gated is None else gated + layer_out
        update = self.fuse(gated) * mask.unsqueeze(-1).to(gated.dtype)
        return last + update

    def _layer(self, i, tokens, memory, mask):
        """Gated sum of layer i's short- and long-range adapter outputs, [B, T, d]."""
        outputs = (self.output_dropout(getattr(self, name)[i](tokens, memory, mask))
                   for name in self.ranges)
        return sum(self.gates[g, i] * out for g, out in enumerate(outputs))

    def gate_norms(self) -> dict:
        """``{(range, layer position): L2 norm of that adapter's gate}``: how open each adapter
        is (with ``zero_init="gates"`` all start at zero)."""
        norms = self.gates.detach().float().norm(dim=-1).cpu()
        return {(name, layer): float(norms[g, layer]) for g, name in enumerate(self.ranges)
                for layer in range(self.num_layers)}

    def _check_shapes(self, last, inter, mask):
        batch, length, dim = last.shape
        expected = (batch, self.num_layers, length, self.num_tokens, dim)
        if tuple(inter.shape) != expected:
            raise ValueError(f"LoSA expects inter of shape {expected} [B, L, T, K, D], "
                             f"got {tuple(inter.shape)}")
        if tuple(mask.shape) != (batch, length) or mask.dtype != torch.bool:
            raise ValueError(f"LoSA expects a bool mask of shape {(batch, length)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")


def count_trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

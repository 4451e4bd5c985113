"""Building blocks of the detection head, all on [B, T, C] sequences with a [B, T] bool mask.

Every block returns zeros at padded steps, so a padded step can never leak into a valid one
through a convolution or a pooling window.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def downsample_mask(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """The mask of a sequence subsampled by ``stride`` (nearest: step t keeps step t*stride)."""
    return mask[:, ::stride]


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x * mask.unsqueeze(-1).to(x.dtype)


class MaskedConv1d(nn.Module):
    """1-D convolution over time on [B, T, C] ('same' padding; ``stride`` subsamples)."""

    def __init__(self, in_dim, out_dim, kernel_size=3, stride=1, groups=1, bias=True):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.stride = stride
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size, stride=stride,
                              padding=kernel_size // 2, groups=groups, bias=bias)

    def forward(self, x, mask):
        out_mask = downsample_mask(mask, self.stride)
        y = self.conv(x.transpose(1, 2)).transpose(1, 2)
        return zero_padding(y, out_mask), out_mask


class ConvNormReLU(nn.Module):
    """Masked conv, LayerNorm over channels, ReLU: the unit of the embedding and the towers."""

    def __init__(self, in_dim, out_dim, kernel_size=3):
        super().__init__()
        self.conv = MaskedConv1d(in_dim, out_dim, kernel_size, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x, mask):
        x, mask = self.conv(x, mask)
        return zero_padding(F.relu(self.norm(x)), mask)


def local_attention_mask(mask: torch.Tensor, window: int) -> torch.Tensor:
    """[B, T, T] bool: query t may attend to valid keys within window//2 steps of t.

    Padded queries may attend anywhere: an empty softmax row would give NaN, and their outputs
    are zeroed anyway.
    """
    positions = torch.arange(mask.shape[1], device=mask.device)
    band = (positions[:, None] - positions[None, :]).abs() <= window // 2
    return (band & mask.unsqueeze(1)) | ~mask.unsqueeze(-1)


class LocalSelfAttention(nn.Module):
    """Multi-head self-attention within a local window; with ``stride`` 2 it also halves T.

    The stride is applied before attending: a depthwise strided convolution (plus LayerNorm)
    summarises each pair of steps, then the shorter sequence attends to itself.
    """

    def __init__(self, dim, num_heads, window, stride=1, dropout=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window = window
        self.dropout = dropout
        self.pool = None
        if stride > 1:
            self.pool = MaskedConv1d(dim, dim, 3, stride=stride, groups=dim, bias=False)
            self.pool_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x, mask):
        if self.pool is not None:
            x, mask = self.pool(x, mask)
            x = self.pool_norm(x)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=local_attention_mask(mask, self.window).unsqueeze(1),
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))
        return zero_padding(out, mask), mask


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with local attention; ``stride`` 2 makes it a pyramid step.

    The residual path is max-pooled with the same stride so both paths have the same length.
    """

    def __init__(self, dim, num_heads, window, stride=1, mlp_ratio=4.0, dropout=0.0,
                 drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LocalSelfAttention(dim, num_heads, window, stride, dropout)
        self.skip = nn.MaxPool1d(3, stride, padding=1) if stride > 1 else None
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, mask):
        # Re-zero the padding after the norm (LayerNorm maps 0 to its bias): a strided conv
        # reading past the last valid step then sees zeros, as at the end of the sequence.
        attended, out_mask = self.attn(zero_padding(self.norm1(x), mask), mask)
        if self.skip is not None:
            x = self.skip(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.drop_path(attended)
        x = x + self.drop_path(zero_padding(self.mlp(self.norm2(x)), out_mask))
        return zero_padding(x, out_mask), out_mask


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's residual branch with probability
    ``rate`` and scale the kept ones by 1 / (1 - rate) so the expected output is unchanged.

    Written here rather than imported from timm so stage two (train, infer, evaluate) never
    pays timm's multi-second import; only the backbone in ``extract/`` needs timm.
    """

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0:
            return x
        keep = 1 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class Scale(nn.Module):
    """A learnable scalar (one per pyramid level, for the shared regression tower)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return x * self.scale

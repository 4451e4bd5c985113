"""Building blocks of the detection head, all on [B, T, C] sequences with a [B, T] bool mask.

They follow ActionFormer's (happyharrycn/actionformer_release) blocks step for step, so that
the same weights give the same outputs. In particular, convolutions zero their output at padded
steps but nothing re-zeroes after a LayerNorm or a ReLU: a padded step then holds a constant
(LayerNorm maps a zero step to its bias), and the convolutions at the last valid steps read it.
That is ActionFormer's arithmetic; it makes outputs near the end of a video depend on whether
padding follows it, which is why the head pads to a fixed length rule (``padded_length``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from head.config import GLOBAL_WINDOW


def downsample_mask(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """The mask of a sequence subsampled by ``stride`` (nearest: step t keeps step t*stride)."""
    return mask[:, ::stride]


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x * mask.unsqueeze(-1).to(x.dtype)


def as_image(x: torch.Tensor) -> torch.Tensor:
    """[B, T, C] as a [B, C, 1, T] view, which is channels-last in memory: 2-D convolution and
    pooling take it and give their output channels-last too, so that ``from_image`` is again
    a contiguous [B, T, C], with no layout copy either way (1-D ops on a transposed [B, T, C]
    copy it in and out, which cost a training step more than the convolutions themselves)."""
    return x.transpose(1, 2).unsqueeze(2)


def from_image(y: torch.Tensor) -> torch.Tensor:
    return y.squeeze(2).transpose(1, 2)


class MaskedConv1d(nn.Module):
    """1-D convolution over time on [B, T, C] ('same' padding; ``stride`` subsamples), its
    output zeroed at padded steps. The bias starts at zero. The weights are a Conv1d's (the
    checkpoint layout); it runs as a 2-D convolution of height 1 (see ``as_image``)."""

    def __init__(self, in_dim, out_dim, kernel_size=3, stride=1, groups=1, bias=True):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.stride = stride
        self.conv = nn.Conv1d(in_dim, out_dim, kernel_size, stride=stride,
                              padding=kernel_size // 2, groups=groups, bias=bias)
        if bias:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x, mask):
        out_mask = downsample_mask(mask, self.stride)
        conv = self.conv
        y = F.conv2d(as_image(x), conv.weight.unsqueeze(2), conv.bias, (1, self.stride),
                     (0, conv.padding[0]), groups=conv.groups)
        return zero_padding(from_image(y), out_mask), out_mask


class ConvNormReLU(nn.Module):
    """Masked conv (no bias), LayerNorm over channels, ReLU: the unit of the embedding and the
    towers."""

    def __init__(self, in_dim, out_dim, kernel_size=3):
        super().__init__()
        self.conv = MaskedConv1d(in_dim, out_dim, kernel_size, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x, mask):
        return F.relu(self.norm(self.conv(x, mask)[0]))


def banded_attention(q, k, v, key_mask, window: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v where query t sees only keys t-w..t+w (w = window // 2).

    q, k, v [B, heads, T, d]; key_mask [B, T] bool. The sequence is cut into blocks of 2w
    queries; each block's scores are taken against its 2w keys and the w on either side
    ([2w, 4w] per block), so memory and time grow as T x window, never T x T. As in ActionFormer,
    a padded key adds -1e4 to its score (keys beyond either end of the sequence count as
    padded), keys outside the band are left out, and every query sees at least itself, so no
    row is empty.
    """
    half = window // 2
    block = 2 * half
    length = q.shape[2]
    extra = -length % block  # a level's length is a multiple of 2w in the head; others pad
    blocks = (length + extra) // block
    scale = q.shape[-1] ** -0.5
    q = q * scale
    if extra:
        q = F.pad(q, (0, 0, 0, extra))
    q = q.unflatten(2, (blocks, block))
    k, v = (F.pad(t, (0, 0, half, half + extra)).unfold(2, block + 2 * half, block)
            for t in (k, v))                                  # [B, h, blocks, d, 4w] views
    key_bias = F.pad((~key_mask).to(q.dtype) * -1e4, (half, half + extra), value=-1e4)
    key_bias = key_bias.unfold(1, block + 2 * half, block)   # [B, blocks, 4w]
    # Key j of a block is step j - w of its first query: query i sees j in [i, i + 2w].
    steps = torch.arange(block + 2 * half, device=q.device)
    offset = steps - steps[:block, None]
    band = torch.zeros(offset.shape, dtype=q.dtype, device=q.device).masked_fill_(
        (offset < 0) | (offset > 2 * half), float("-inf"))
    scores = q @ k + (key_bias[:, None, :, None, :] + band)
    out = scores.softmax(-1) @ v.transpose(-1, -2)
    return out.flatten(2, 3)[:, :, :length]


def attention(q, k, v, key_mask, window: int) -> torch.Tensor:
    """Multi-head attention of queries over valid keys: within ``window`` (banded), or over the
    whole sequence with GLOBAL_WINDOW. Rows of padded queries are computed but meaningless
    (their outputs are zeroed afterwards)."""
    if window == GLOBAL_WINDOW:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    return banded_attention(q, k, v, key_mask, window)


class LocalSelfAttention(nn.Module):
    """Multi-head self-attention within a local window (ActionFormer's LocalMaskedMHCA, or its
    MaskedMHCA with GLOBAL_WINDOW); with ``stride`` 2 it also halves T.

    Query, key and value each get their own depthwise convolution (kernel 3, the block's
    stride) and LayerNorm before their projection; the convolutions give the attention its
    sense of order (there is no position encoding by default) and do the downsampling.
    """

    def __init__(self, dim, num_heads, window, stride=1, dropout=0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window = window
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_conv", MaskedConv1d(dim, dim, 3, stride=stride, groups=dim,
                                                       bias=False))
            setattr(self, f"{name}_norm", nn.LayerNorm(dim))
            setattr(self, name, nn.Linear(dim, dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x, mask):
        heads = []
        for name in ("query", "key", "value"):
            y, out_mask = getattr(self, f"{name}_conv")(x, mask)
            y = getattr(self, name)(getattr(self, f"{name}_norm")(y))
            heads.append(y.unflatten(-1, (self.num_heads, -1)).transpose(1, 2))
        q, k, v = heads
        out = attention(q, k, v, out_mask, self.window)
        out = self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))
        return zero_padding(out, out_mask), out_mask


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with local attention; ``stride`` 2 makes it a pyramid step.

    The residual path is max-pooled with the same stride so both paths have the same length.
    With ``drop_path`` > 0 both residual branches go through an AffineDropPath (a per-channel
    scale starting at 1e-4, then stochastic depth), so the block starts close to the identity.
    """

    def __init__(self, dim, num_heads, window, stride=1, mlp_ratio=4.0, dropout=0.0,
                 drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LocalSelfAttention(dim, num_heads, window, stride, dropout)
        self.skip = nn.MaxPool2d((1, 3), (1, stride), padding=(0, 1)) if stride > 1 else None
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))
        make = (lambda: AffineDropPath(dim, drop_path)) if drop_path > 0 else nn.Identity
        self.drop_path_attn, self.drop_path_mlp = make(), make()

    def forward(self, x, mask):
        attended, out_mask = self.attn(self.norm1(x), mask)
        if self.skip is not None:
            x = from_image(self.skip(as_image(x)))
        x = zero_padding(x, out_mask) + self.drop_path_attn(attended)
        x = x + self.drop_path_mlp(zero_padding(self.mlp(self.norm2(x)), out_mask))
        return x, out_mask


class AffineDropPath(nn.Module):
    """Per-channel learnable scale (LayerScale, starting at ``init``), then stochastic depth:
    in training, zero a whole sample's residual branch with probability ``rate`` and scale the
    kept ones by 1 / (1 - rate) so the expected output is unchanged.

    Written here rather than imported from timm so stage two (train, infer, evaluate) never
    pays timm's multi-second import; only the backbone in ``extract/`` needs timm.
    """

    def __init__(self, dim: int, rate: float, init: float = 1e-4):
        super().__init__()
        self.rate = rate
        self.scale = nn.Parameter(torch.full((dim,), init))

    def forward(self, x):
        x = x * self.scale
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

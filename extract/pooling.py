"""Pool a block's tokens to a small (t, h, w) grid: the K = t*h*w tokens per clip the store keeps.

The backbone's tokens come in (T', H', W') order (tubelet-major, then rows, then columns: the
order of ``Conv3d`` output flattened), so a reshape recovers the grid; adaptive average pooling
then splits each axis into near-equal bins exactly as ``torch.nn.AdaptiveAvgPool3d`` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losa_tal import ConfigError


def check_grid(tokens: tuple[int, int, int], token_grid: tuple[int, int, int]) -> None:
    """Refuse a pooled grid finer than the backbone's token grid along any axis."""
    if any(want > have for want, have in zip(tokens, token_grid)):
        raise ConfigError("tokens", f"grid {'x'.join(map(str, tokens))} is finer than the "
                          f"backbone's token grid {'x'.join(map(str, token_grid))}")


def pool_tokens(tokens: torch.Tensor, token_grid: tuple[int, int, int],
                grid: tuple[int, int, int]) -> torch.Tensor:
    """Block output [B, N, D] with N = T'*H'*W' -> [B, K, D], K = t*h*w, in (t, h, w) order."""
    batch, count, dim = tokens.shape
    if count != token_grid[0] * token_grid[1] * token_grid[2]:
        raise ValueError(f"{count} tokens do not form the grid {token_grid}")
    # Averages in fp32 even under bf16 autocast.
    volume = tokens.float().transpose(1, 2).reshape(batch, dim, *token_grid)
    if tuple(grid) == tuple(token_grid):
        pooled = volume
    else:
        pooled = F.adaptive_avg_pool3d(volume, grid)
    return pooled.flatten(2).transpose(1, 2)

"""Pool a block's tokens to a small (t, h, w) grid: the K = t*h*w tokens per clip the store keeps.

The backbone's tokens come in (T', H', W') order (tubelet-major, then rows, then columns: the
order of ``Conv3d`` output flattened), so a reshape recovers the grid; adaptive average pooling
then splits each axis into near-equal bins exactly as ``torch.nn.AdaptiveAvgPool3d`` does.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from losa_tal import InputError


def parse_tokens(text: str | tuple | list, option: str = "--tokens") -> tuple[int, int, int]:
    """``"2x1x1"`` (or a 3-sequence) -> (t, h, w); a single number n means (n, 1, 1)."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+)\s*x\s*(\d+)\s*)?", str(text))
        if not match:
            raise InputError(f"{option}: expected a grid like 2x1x1, got {text!r}")
        parts = [int(g) if g else 1 for g in match.groups()]
    if len(parts) != 3 or not all(isinstance(p, int) and p >= 1 for p in parts):
        raise InputError(f"{option}: expected three positive integers t x h x w, got {text!r}")
    return tuple(parts)


def check_grid(tokens: tuple[int, int, int], token_grid: tuple[int, int, int]) -> None:
    """Refuse a pooled grid finer than the backbone's token grid along any axis."""
    if any(want > have for want, have in zip(tokens, token_grid)):
        raise InputError(f"--tokens: grid {'x'.join(map(str, tokens))} is finer than the "
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

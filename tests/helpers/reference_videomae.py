"""A deliberately plain VideoMAEv2 ViT, for the tests only: the yardstick for extract/backbone.py.

It follows the structure of the official VideoMAEv2 fine-tuning model (OpenGVLab/VideoMAEv2,
models/modeling_finetune.py) step by step, without any of our shortcuts: the position table is
built position by position in float64 with numpy, stored as a plain float32 tensor for one fixed
clip size and cast with ``type_as``; attention concatenates an explicit zero key bias and
computes ``softmax(q * scale @ k^T) @ v`` by hand. Its state dict uses the official key names,
so one set of weights loads into both models. Written for these tests, not copied.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def reference_position_table(n_position, d_hid):
    """[1, n_position, d_hid] float32, one angle at a time, as the official helper does."""
    rows = []
    for pos in range(n_position):
        rows.append([pos / np.power(10000, 2 * (j // 2) / d_hid) for j in range(d_hid)])
    table = np.array(rows)
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.FloatTensor(table).unsqueeze(0)


class RefPatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, num_frames, tubelet_size):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2 * (num_frames // tubelet_size)
        tubelet = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=tubelet, stride=tubelet)

    def forward(self, x):
        x = self.proj(x)              # [B, D, T', H', W']
        x = x.flatten(2)              # [B, D, N]
        return x.transpose(1, 2)      # [B, N, D]


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            k_bias = torch.zeros_like(self.v_bias)
            bias = torch.cat((self.q_bias, k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, C // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        weights = q @ k.transpose(-2, -1)
        weights = weights.softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, init_values):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))
        if init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = None
            self.gamma_2 = None

    def forward(self, x):
        if self.gamma_1 is None:
            x = x + self.attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
        else:
            x = x + self.gamma_1 * self.attn(self.norm1(x))
            x = x + self.gamma_2 * self.mlp(self.norm2(x))
        return x


class RefVideoMAEv2(nn.Module):
    """The official model's structure; the table is fixed to ``all_frames`` x ``img_size``."""

    def __init__(self, img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads,
                 mlp_ratio, qkv_bias, init_values, all_frames, tubelet_size, use_mean_pooling):
        super().__init__()
        self.patch_embed = RefPatchEmbed(img_size, patch_size, in_chans, embed_dim, all_frames,
                                         tubelet_size)
        # A plain attribute, as in the official code: not a parameter, not in the state dict.
        self.pos_embed = reference_position_table(self.patch_embed.num_patches, embed_dim)
        self.blocks = nn.ModuleList([
            RefBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values) for _ in range(depth)])
        if use_mean_pooling:
            self.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.fc_norm = None
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def block_outputs(self, x):
        """(pooled feature, [output of every block]) for clips [B, C, T, H, W]."""
        B = x.shape[0]
        x = self.patch_embed(x)
        x = x + self.pos_embed.expand(B, -1, -1).type_as(x).to(x.device).clone().detach()
        outputs = []
        for blk in self.blocks:
            x = blk(x)
            outputs.append(x)
        if self.fc_norm is not None:
            pooled = self.fc_norm(x.mean(1))
        else:
            pooled = self.norm(x[:, 0])
        return pooled, outputs

    def forward_features(self, x):
        return self.block_outputs(x)[0]

    def forward(self, x):
        return self.head(self.forward_features(x))

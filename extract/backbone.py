"""The VideoMAEv2 video ViT, presets, and loading of the official checkpoints.

The model takes the official constructor's keyword names and produces a state dict with the
official key names, so released checkpoints load as they are. Its outputs equal the official
implementation's (tests/helpers/reference_videomae.py re-implements that one plainly for the tests).
Three things differ from the official code, none of them in the numbers:
  - attention runs through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels);
  - the fixed sin-cos position table is computed for whatever clip size comes in (and cached),
    instead of once for the constructor's size;
  - ``forward_intermediates`` / ``forward_taps`` return chosen block outputs in the same pass.

Tokens are flattened in (t, h, w) order, the order of the Conv3d patch grid: a block output
``[B, N, D]`` reshapes to ``[B, T', H', W', D]`` with ``model.token_grid_for(T, H, W)``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import math
import operator
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_

from losa_tal import ConfigError, input_error

LAYER_NORM_EPS = 1e-6  # every released VideoMAEv2 model uses 1e-6, not LayerNorm's default 1e-5


def sincos_position_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed 1-D sin-cos table over the flattened tokens, float32 ``[num_positions, dim]``.

    Channel ``j`` of position ``p`` holds ``sin`` (even j) or ``cos`` (odd j) of
    ``p / 10000 ** (2 * (j // 2) / dim)``. Like the official code it is computed in float64 with
    numpy and rounded once to float32; the model casts that float32 table to the activations'
    dtype, as the official ``type_as`` does, so bf16/fp16 runs round the very same values.
    A table for N positions is the first N rows of any longer one.
    """
    # The official code raises 10000 to each exponent as a numpy scalar; doing the same (rather
    # than a vectorised power, which may take a different SIMD path) keeps the table bit-exact.
    denominators = np.array([np.power(10000, 2 * (j // 2) / dim) for j in range(dim)])
    table = np.arange(num_positions, dtype=np.float64)[:, None] / denominators[None, :]
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.from_numpy(table).to(torch.float32)


class PatchEmbed(nn.Module):
    """Cuts a clip ``[B, C, T, H, W]`` into tubelets and projects each to a token ``[B, N, D]``."""

    def __init__(self, patch_size: int, tubelet_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with VideoMAEv2's query and value biases (no key bias)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_scale: float | None,
                 attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        bias = None
        if self.q_bias is not None:
            # A key bias only shifts every logit of a query equally, so the checkpoints have none;
            # a zero block keeps q, k and v in one fused matmul.
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(batch, tokens, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(batch, tokens, dim)))


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale (``gamma_1``/``gamma_2``)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 qk_scale: float | None, drop: float, attn_drop: float, drop_path: float,
                 init_values: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        # The official MLP applies dropout after fc2 only, hence (0, drop).
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=(0.0, drop))
        if init_values > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class VideoMAEv2(nn.Module):
    """VideoMAEv2 ViT over clips ``[B, C, T, H, W]``, with the official constructor's arguments.

    Defaults are the official constructor's, except ``num_classes=0`` (no head: we extract
    features). ``with_cp`` (gradient checkpointing) is accepted and ignored: the backbone is
    frozen. ``use_learnable_pos_emb`` and ``cos_attn`` exist only with their default ``False``:
    no released VideoMAEv2 model uses them. LayerNorm eps is fixed at 1e-6 (all released models).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=0, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=False, qk_scale=None,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, head_drop_rate=0.0,
                 init_values=0.0, init_scale=0.0, all_frames=16, tubelet_size=2,
                 use_mean_pooling=True, use_learnable_pos_emb=False, with_cp=False,
                 cos_attn=False):
        super().__init__()
        _check_config(img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads,
                      mlp_ratio, all_frames, tubelet_size, use_learnable_pos_emb, cos_attn)
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.in_chans = in_chans
        self.all_frames = all_frames
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(patch_size, tubelet_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        drop_paths = np.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                  drop_paths[i], init_values) for i in range(depth))
        # With mean pooling the official model has fc_norm and an identity norm; without, norm.
        self.norm = nn.Identity() if use_mean_pooling else nn.LayerNorm(embed_dim,
                                                                         eps=LAYER_NORM_EPS)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS) if use_mean_pooling else None
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._position_tables: dict[tuple, torch.Tensor] = {}
        self._init_weights(init_scale)

    def _init_weights(self, init_scale: float) -> None:
        # The official initialisation; the Conv3d keeps PyTorch's default, as there.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(init_scale)
                self.head.bias.mul_(init_scale)

    # ---- geometry -------------------------------------------------------------------------

    def token_grid_for(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid (T', H', W') for clips of this size; N == T' * H' * W'."""
        return (num_frames // self.tubelet_size, height // self.patch_size,
                width // self.patch_size)

    @property
    def token_grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W') for the constructor's ``all_frames`` x ``img_size``."""
        return self.token_grid_for(self.all_frames, *self.img_size)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    # ---- forward passes -------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Clips ``[B, C, T, H, W]`` -> pooled features ``[B, D]``: ``fc_norm(mean of tokens)``,
        or ``norm(first token)`` without mean pooling (the official ``forward_features``)."""
        return self._pool(self._run_blocks(self._embed(x), len(self.blocks), ())[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``; without a head, the pooled features."""
        return self.head(self.head_drop(self.forward_features(x)))

    def forward_intermediates(self, x: torch.Tensor, indices: Iterable[int]) -> list[torch.Tensor]:
        """Outputs ``[B, N, D]`` of the blocks at ``indices`` (0-based; negative counts from the
        end), in the order asked. Blocks after the last one asked for are not run."""
        wanted = self.block_indices(indices)
        if not wanted:
            return []
        _, taps = self._run_blocks(self._embed(x), max(wanted) + 1, wanted)
        return [taps[i] for i in wanted]

    def forward_taps(self, x: torch.Tensor,
                     indices: Iterable[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(forward_features(x), forward_intermediates(x, indices))`` in one pass."""
        wanted = self.block_indices(indices)
        x, taps = self._run_blocks(self._embed(x), len(self.blocks), wanted)
        return self._pool(x), [taps[i] for i in wanted]

    def block_indices(self, indices: Iterable[int]) -> list[int]:
        """Block indices made non-negative; an index outside the model is a ConfigError."""
        depth = len(self.blocks)
        resolved = []
        for index in map(operator.index, indices):
            if not -depth <= index < depth:
                raise ConfigError("layers", f"block {index} does not exist in a {depth}-block "
                                  f"backbone (use 0..{depth - 1}, or negative from the end)")
            resolved.append(index % depth)
        return resolved

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.patch_embed(x)
        return self.pos_drop(x + self._position_table(x.shape[1], x.device, x.dtype))

    def _run_blocks(self, x: torch.Tensor, stop: int,
                    wanted: Iterable[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        wanted = set(wanted)
        taps = {}
        for i in range(stop):
            x = self.blocks[i](x)
            if i in wanted:
                taps[i] = x
        return x, taps

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """The stored feature, in float32 whatever the activations' dtype: with bf16 weights a
        bf16 mean of 2048 tokens would round before the norm re-scales it."""
        norm, x = (self.fc_norm, x.float().mean(1)) if self.fc_norm is not None \
            else (self.norm, x[:, 0].float())
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                                norm.eps)

    @torch.compiler.disable  # a cache lookup: keep it out of compiled graphs
    def _position_table(self, num_tokens: int, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
        key = (num_tokens, device, dtype)
        table = self._position_tables.get(key)
        if table is None:
            table = sincos_position_table(num_tokens, self.embed_dim).to(device=device, dtype=dtype)
            self._position_tables[key] = table
        return table

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected clips [B, {self.in_chans}, T, H, W], got {list(x.shape)}")
        frames, height, width = x.shape[2:]
        if frames % self.tubelet_size or height % self.patch_size or width % self.patch_size:
            raise ValueError(f"clip of {frames} frames of {height}x{width} does not divide into "
                             f"{self.tubelet_size}x{self.patch_size}x{self.patch_size} tubelets")


def _check_config(img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads,
                  mlp_ratio, all_frames, tubelet_size, use_learnable_pos_emb, cos_attn) -> None:
    """Reject constructor values that would build a broken or non-VideoMAEv2 model."""
    if len(to_2tuple(img_size)) != 2:
        raise ValueError(f"img_size must be one integer or [height, width], got {img_size!r}")
    sizes = dict(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                 num_heads=num_heads, all_frames=all_frames, tubelet_size=tubelet_size)
    sizes.update(zip(("img_size[0]", "img_size[1]"), to_2tuple(img_size)))
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be 0 (no head) or a positive integer, "
                         f"got {num_classes!r}")
    if not isinstance(mlp_ratio, (int, float)) or int(embed_dim * mlp_ratio) <= 0:
        raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    if any(side % patch_size for side in to_2tuple(img_size)):
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    if all_frames % tubelet_size:
        raise ValueError(f"all_frames {all_frames} is not a multiple of "
                         f"tubelet_size {tubelet_size}")
    if use_learnable_pos_emb or cos_attn:
        raise ValueError("use_learnable_pos_emb and cos_attn are not supported "
                         "(no released VideoMAEv2 model uses them)")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works on a model built on the ``meta`` device, too)."""
    return sum(p.numel() for p in model.parameters())


# ---- presets ----------------------------------------------------------------------------------

_RELEASED = dict(img_size=224, in_chans=3, num_classes=0, qkv_bias=True, init_values=0.0,
                 all_frames=16, tubelet_size=2, use_mean_pooling=True)

# The sizes of the released VideoMAEv2 models (16-frame clips, tubelet 2, 224 px).
PRESETS: dict[str, dict] = {
    "vit_s": dict(_RELEASED, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit_b": dict(_RELEASED, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "vit_l": dict(_RELEASED, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
    "vit_h": dict(_RELEASED, patch_size=16, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0),
    "vit_g": dict(_RELEASED, patch_size=14, embed_dim=1408, depth=40, num_heads=16,
                  mlp_ratio=48 / 11),
}

CONSTRUCTOR_ARGS = tuple(inspect.signature(VideoMAEv2).parameters)


def backbone_config(spec: str | Mapping, *, source: str = "backbone", **overrides) -> dict:
    """Every constructor argument for ``spec``: a preset name, or a dict of constructor kwargs
    that may name a base preset under ``"preset"``; ``overrides`` win. ``source`` (the file or
    option the spec came from) starts any InputError message. The result is JSON-compatible:
    record it to rebuild the same model."""
    if isinstance(spec, str):
        spec = {"preset": spec}
    if not isinstance(spec, Mapping):
        raise input_error(source, f"a backbone is a preset name or a dict of constructor "
                          f"arguments, not {type(spec).__name__}")
    kwargs = dict(spec)
    preset = kwargs.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise input_error(source, f"unknown backbone preset {preset!r} "
                          f"(choose one of {', '.join(PRESETS)})")
    kwargs = {**PRESETS.get(preset, {}), **kwargs, **overrides}
    unknown = sorted(set(kwargs) - set(CONSTRUCTOR_ARGS))
    if unknown:
        raise input_error(source, f"unknown backbone argument(s) {', '.join(unknown)} "
                          f"(accepted: preset, {', '.join(CONSTRUCTOR_ARGS)})")
    signature = inspect.signature(VideoMAEv2)
    config = {name: kwargs.get(name, parameter.default)
              for name, parameter in signature.parameters.items()}
    _check_kinds(config, source)
    return config


# Constructor arguments by kind, checked before anything is built ("false", a string, would
# otherwise be a true flag; sizes are checked by the constructor itself, _check_config).
_FLAGS = ("qkv_bias", "use_mean_pooling", "use_learnable_pos_emb", "with_cp", "cos_attn")
_RATES = ("drop_rate", "attn_drop_rate", "drop_path_rate", "head_drop_rate")
_FINITE = ("init_values", "init_scale")


def _check_kinds(config: dict, source: str) -> None:
    def refuse(name, kind):
        raise input_error(source, f"{name} must be {kind}, got {config[name]!r}")

    for name in _FLAGS:
        if not isinstance(config[name], bool):
            refuse(name, "true or false")
    for name in _RATES:
        if not (_is_number(config[name]) and 0 <= config[name] < 1):
            refuse(name, "a number in [0, 1)")
    for name in _FINITE:
        if not (_is_number(config[name]) and math.isfinite(config[name])):
            refuse(name, "a finite number")
    if not (_is_number(config["mlp_ratio"]) and math.isfinite(config["mlp_ratio"])
            and config["mlp_ratio"] > 0):
        refuse("mlp_ratio", "a positive number")
    scale = config["qk_scale"]
    if scale is not None and not (_is_number(scale) and math.isfinite(scale) and scale > 0):
        refuse("qk_scale", "null or a positive number")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def build_backbone(spec: str | Mapping, *, source: str = "backbone", **overrides) -> VideoMAEv2:
    """Build a VideoMAEv2 from a preset name or a dict of kwargs (see ``backbone_config``).

    Random weights; load released ones with ``load_checkpoint``. To size a model without
    allocating it, build it under ``with torch.device("meta"):``.
    """
    config = backbone_config(spec, source=source, **overrides)
    try:
        return VideoMAEv2(**config)
    except (TypeError, ValueError) as err:
        raise input_error(source, str(err)) from None


# ---- checkpoints ------------------------------------------------------------------------------

# Keys of a pretraining checkpoint that belong to the MAE decoder, not the encoder we run.
_DECODER_KEYS = ("decoder.", "encoder_to_decoder.", "mask_token", "pos_embed")


def load_checkpoint(model: VideoMAEv2, path: str | Path, device=None, dtype=None) -> str:
    """Load an official VideoMAEv2 checkpoint into ``model``; return the file's sha256 (hex).

    A model built on the ``meta`` device takes the checkpoint's tensors themselves, each moved
    to ``device`` in ``dtype`` (``load_state_dict(assign=True)``): a ViT-g is then never held
    as an fp32 model in host memory on its way to a GPU in bf16. Otherwise the weights are
    copied into the model's own tensors.

    Accepted: fine-tuned state dicts, plain or wrapped under ``model`` or ``module``, and
    pretraining checkpoints (``encoder.*`` keys; decoder and mask-token keys are ignored).
    A head-less model ignores ``head.*``. A stored ``pos_embed`` is dropped when it is the fixed
    sin-cos table (which we compute ourselves) and refused otherwise (a learned embedding this
    model cannot use). Missing, unexpected or misshapen keys and non-finite values are refused
    with an InputError naming them: wrong weights never load silently.
    """
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "checkpoint file not found")
    digest = _sha256(path)
    state = _unwrap_state_dict(_torch_load(path), path)
    state = _drop_fixed_position_table(_encoder_of(state, path), model, path)
    if model.num_classes == 0:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    _check_keys(state, model, path)
    on_meta = next(model.parameters()).is_meta
    if on_meta:
        state = {key: value.to(device=device or "cpu", dtype=dtype or value.dtype)
                 for key, value in state.items()}
    with torch.no_grad():
        model.load_state_dict(state, strict=True, assign=on_meta)
    return digest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _torch_load(path: Path):
    # Training checkpoints of the official code store their argparse options next to the
    # weights; a Namespace is plain data, so allowing it keeps weights-only loading safe.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        forbidden = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        if forbidden:
            raise input_error(path, f"refused: it holds a pickled Python object "
                              f"({forbidden.group(1)}), and checkpoints are loaded as plain "
                              "tensors only (weights_only)") from None
        raise input_error(path, "not a PyTorch checkpoint (unreadable as weights)") from None
    except Exception as err:  # noqa: BLE001 - corrupt files fail in many ways inside torch.load
        reason = str(err).split("\n")[0][:120]
        reason = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
        raise input_error(path, f"not a PyTorch checkpoint ({reason})") from None


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for wrapper in ("model", "module"):  # the official extraction script's order
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    tensors = isinstance(obj, Mapping) and obj and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    if not tensors:
        raise input_error(path, "not a model checkpoint: expected a state dict of tensors, "
                          "plain or under 'model' or 'module'")
    return dict(obj)


def _encoder_of(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """A pretraining checkpoint's encoder under the model's key names; others left as they are."""
    if not any(k.startswith("encoder.") for k in state):
        return state
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    # Anything neither encoder nor decoder stays, so that the key check reports it.
    leftovers = {k: v for k, v in state.items()
                 if not k.startswith("encoder.") and not k.startswith(_DECODER_KEYS)}
    twice = sorted(encoder.keys() & leftovers.keys())
    if twice:  # which of the two copies is meant cannot be known
        raise input_error(path, f"weights given twice, plain and under 'encoder.': "
                          f"{', '.join(twice[:5])}")
    return {**encoder, **leftovers}


def _drop_fixed_position_table(state: dict[str, torch.Tensor], model: VideoMAEv2,
                               path: Path) -> dict[str, torch.Tensor]:
    stored = state.pop("pos_embed", None)
    if stored is None:
        return state
    table = stored.detach().float().reshape(-1, stored.shape[-1])
    fixed = (stored.shape[-1] == model.embed_dim
             and torch.allclose(table, sincos_position_table(len(table), model.embed_dim),
                                atol=1e-2))  # loose enough for a table stored in fp16 or bf16
    if not fixed:
        raise input_error(path, f"pos_embed {list(stored.shape)} is not the fixed sin-cos table: "
                          "a learned position embedding, which this VideoMAEv2 does not support")
    return state


def _check_keys(state: dict[str, torch.Tensor], model: VideoMAEv2, path: Path) -> None:
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    misshapen = [f"{k} {list(state[k].shape)} (model: {list(expected[k].shape)})"
                 for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if misshapen:
        problems.append(f"wrong shape {_some(misshapen)}")
    if problems:
        raise input_error(path, "does not fit this backbone: " + "; ".join(problems)
                          + _mismatch_hint(missing, unexpected))
    not_float = [k for k, v in state.items() if not v.is_floating_point()]
    if not_float:
        raise input_error(path, f"non-floating-point weights {_some(not_float)}")
    not_finite = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if not_finite:
        raise input_error(path, f"non-finite values (nan or inf) in {_some(not_finite)}")


def _some(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _mismatch_hint(missing: list[str], unexpected: list[str]) -> str:
    if "fc_norm.weight" in missing and "norm.weight" in unexpected:
        return (" (the checkpoint's final norm is per token, as in pretraining checkpoints: "
                "build the backbone with use_mean_pooling=false)")
    if "norm.weight" in missing and "fc_norm.weight" in unexpected:
        return " (the checkpoint mean-pools: build the backbone with use_mean_pooling=true)"
    if any(k.startswith("blocks.") for k in missing + unexpected):
        return " (is the backbone preset or config the one this checkpoint was trained with?)"
    return ""

"""ActionFormer checkpoints: fill an ``ActionFormerHead`` from the official code's weights.

The official model (happyharrycn/actionformer_release, ``PtTransformer``) keeps the same
weights as our head under other names and shapes: its modules work on [B, C, T], so LayerNorm
and LayerScale parameters are [1, C, 1] and the 1x1 projections are Conv1d weights [out, in, 1].
``actionformer_name`` maps each of our parameter names to its name there; the loss normaliser,
a plain float attribute in ActionFormer, is not in its checkpoints and keeps our value.
"""
from __future__ import annotations

import re

import torch

# (our name pattern, ActionFormer's name), tried in order; the first match renames.
_RENAMES = [
    (r"embed\.(\d+)\.conv\.conv\.", r"backbone.embd.\1.conv."),
    (r"embed\.(\d+)\.norm\.", r"backbone.embd_norm.\1."),
    (r"(stem|branch)\.(\d+)\.norm1\.", r"backbone.\1.\2.ln1."),
    (r"(stem|branch)\.(\d+)\.norm2\.", r"backbone.\1.\2.ln2."),
    (r"(stem|branch)\.(\d+)\.", r"backbone.\1.\2."),
    (r"level_norms\.(\d+)\.", r"neck.fpn_norms.\1."),
    (r"(cls|reg)_tower\.layers\.(\d+)\.conv\.conv\.", r"\1_head.head.\2.conv."),
    (r"(cls|reg)_tower\.layers\.(\d+)\.norm\.", r"\1_head.norm.\2."),
    (r"cls_tower\.predict\.conv\.", r"cls_head.cls_head.conv."),
    (r"reg_tower\.predict\.conv\.", r"reg_head.offset_head.conv."),
    (r"reg_scales\.(\d+)\.scale", r"reg_head.scale.\1.scale"),
]
NOT_IN_CHECKPOINTS = {"loss_normalizer"}


def actionformer_name(name: str) -> str:
    """ActionFormer's state-dict key for one of our head's parameter names."""
    for pattern, replacement in _RENAMES:
        renamed, count = re.subn("^" + pattern, replacement, name)
        if count:
            return renamed
    raise KeyError(f"no ActionFormer name for head parameter {name!r}")


def _fitted(ours: torch.Tensor, theirs: torch.Tensor):
    """``theirs`` in our parameter's shape, or None when it is another shape."""
    if theirs.shape == ours.shape:
        return theirs
    if ours.ndim == 2 and theirs.shape == (*ours.shape, 1):          # 1x1 Conv1d -> Linear
        return theirs[..., 0]
    if ours.ndim == 1 and theirs.shape == (1, ours.shape[0], 1):     # [1, C, 1] -> [C]
        return theirs.reshape(-1)
    return None


def actionformer_state_dict(state_dict_or_checkpoint) -> dict:
    """The model weights of a plain state dict or an official training checkpoint
    (``state_dict_ema`` preferred, else ``state_dict``), without ``module.`` prefixes."""
    state = state_dict_or_checkpoint
    for key in ("state_dict_ema", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict or a training checkpoint, got "
                         f"{type(state).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def load_actionformer_weights(head, state_dict_or_checkpoint) -> None:
    """Copy ActionFormer's weights into a constructed ``ActionFormerHead``.

    Every one of the head's parameters must be present in the right shape and nothing else may
    be: otherwise one ValueError names every missing, unexpected and mis-shaped key, and the
    head is left unchanged.
    """
    theirs = actionformer_state_dict(state_dict_or_checkpoint)
    ours = {name: tensor for name, tensor in head.state_dict().items()
            if name not in NOT_IN_CHECKPOINTS}
    wanted = {actionformer_name(name): name for name in ours}
    missing = sorted(set(wanted) - set(theirs))
    unexpected = sorted(set(theirs) - set(wanted))
    loaded, misshaped = {}, []
    for their_name, our_name in wanted.items():
        if their_name in theirs:
            value = theirs[their_name]
            fitted = _fitted(ours[our_name], value) if torch.is_tensor(value) else None
            if fitted is None:
                shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                misshaped.append(f"{their_name} {shape} (expected "
                                 f"{tuple(ours[our_name].shape)})")
            else:
                loaded[our_name] = fitted
    problems = [f"{label}: {', '.join(names)}" for label, names in (
        ("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]
    if problems:
        raise ValueError("ActionFormer weights do not fit this head; " + "; ".join(problems))
    head.load_state_dict(loaded, strict=False)

"""Training checkpoints: tensors and plain data only, written atomically, loaded with weights_only.

A checkpoint is a dict::

    format: "losa-tal-checkpoint", format_version: 1
    epoch: epochs completed, step: optimizer steps completed
    model, ema: state dicts (the EMA weights are the ones evaluated and used for inference)
    optimizer: AdamW state dict, scheduler: {"step": int}
    config: Config.to_dict(), classes: [label names, in output order]
    store: the signature of the store it was trained on (see store_signature)
    best: {"epoch", "average_map"} or None, the best evaluation so far
    inputs (optional): the store and annotations trained on, each {"given", "absolute"} path

No RNG state is needed: every random draw is derived from (seed, epoch, step, sample), so a run
resumed from the end of epoch n draws exactly what an uninterrupted run would.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from losa_tal import input_error, write_output
from store.errors import storage_errors

FORMAT = "losa-tal-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("epoch", "step", "model", "ema", "optimizer", "scheduler", "config", "classes",
                 "store")


def save(path, checkpoint: dict) -> None:
    """Write atomically and durably (``losa_tal.open_output``): a crash or a full disk leaves
    the previous file intact, never half of a new one; a write failure is a one-line error
    naming the file."""
    # Serialised in memory first: torch.save's zip writer turns a failed write (a full disk)
    # into a RuntimeError without the errno; a plain file write keeps it.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, **checkpoint}, buffer)
    with storage_errors(path, "cannot write the checkpoint (the previous one is intact)"):
        write_output(path, buffer.getbuffer(), durable=True)


def load(path) -> dict:
    """Read and sanity-check a checkpoint; anything but one of ours is an InputError."""
    path = Path(path)
    if not path.is_file():
        raise input_error(path, "checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not loadable"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise input_error(path, f"not a loadable checkpoint (tensors and plain data only): "
                          f"{first_line}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise input_error(path, "not a LoSA-TAL training checkpoint")
    if checkpoint.get("format_version") != FORMAT_VERSION:
        raise input_error(path, f"checkpoint format version {checkpoint.get('format_version')} "
                          f"is not supported (expected {FORMAT_VERSION})")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise input_error(path, f"checkpoint lacks {', '.join(missing)}")
    problem = field_problem(checkpoint)
    if problem:
        raise input_error(path, f"checkpoint {problem}")
    return checkpoint


def field_problem(checkpoint: dict) -> str | None:
    """What is wrong with the type of a checkpoint field, if anything.

    The file may have been edited or come from elsewhere: a field of the wrong type must be
    refused here, by name, rather than surface as a TypeError deep inside torch.
    """
    def count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def state_dict(value):
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())

    signature = checkpoint["store"]
    best = checkpoint.get("best")
    inputs = checkpoint.get("inputs")
    checks = [
        ("epoch", count(checkpoint["epoch"]), "a count"),
        ("step", count(checkpoint["step"]), "a count"),
        ("model", state_dict(checkpoint["model"]), "a state dict of tensors"),
        ("ema", state_dict(checkpoint["ema"]), "a state dict of tensors"),
        ("optimizer", isinstance(checkpoint["optimizer"], dict)
         and isinstance(checkpoint["optimizer"].get("state"), dict)
         and isinstance(checkpoint["optimizer"].get("param_groups"), list),
         "an optimizer state dict"),
        ("config", isinstance(checkpoint["config"], dict), "an object"),
        ("classes", isinstance(checkpoint["classes"], list) and checkpoint["classes"]
         and all(isinstance(c, str) for c in checkpoint["classes"]), "a list of class names"),
        ("store", isinstance(signature, dict) and isinstance(signature.get("layers"), list)
         and all(count(layer) for layer in signature["layers"]),
         "a store signature with a list of layers"),
        ("best", best is None or (isinstance(best, dict) and count(best.get("epoch"))
                                  and isinstance(best.get("average_map"), float)),
         "null or {epoch, average_map}"),
        ("inputs", inputs is None or (isinstance(inputs, dict) and all(
            isinstance(record, dict) and isinstance(record.get("given"), str)
            and isinstance(record.get("absolute"), str) for record in inputs.values())),
         "null or {store, annotations} of {given, absolute} paths"),
    ]
    for key, ok, expected in checks:
        if not ok:
            return f"field '{key}' is not {expected}"
    for key in ("model", "ema"):  # NaN weights would predict NaN scores without a word
        broken = [name for name, value in checkpoint[key].items()
                  if value.is_floating_point() and not torch.isfinite(value).all()]
        if broken:
            return f"field '{key}' holds NaN or infinite weights ({', '.join(broken[:3])})"
    return None


def load_into(target, state: dict, path, field: str) -> None:
    """``target.load_state_dict(state)`` for a module or an optimizer; a checkpoint whose
    weights do not fit (missing keys, other shapes, other parameter groups) is one line."""
    try:
        target.load_state_dict(state)
        if isinstance(target, torch.optim.Optimizer):
            _check_optimizer_shapes(target)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        problem = " ".join(str(err).split())
        raise input_error(path, f"weights do not fit the model its config describes "
                          f"({field}: {problem[:300]})") from None


def _check_optimizer_shapes(optimizer) -> None:
    """load_state_dict checks group sizes only; a moment of another shape would fail mid-step."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape != param.shape:
                    raise ValueError(f"state '{name}' of shape {list(value.shape)} for a "
                                     f"parameter of shape {list(param.shape)}")


def store_signature(store, layers) -> dict:
    """What a trained model depends on in a store: backbone, sampling, shapes, layers read."""
    meta = store.meta
    return {
        "backbone": meta.get("backbone"),
        "protocol": meta.get("protocol"),
        "feature_dim": int(store.feature_dim),
        "tokens": None if store.tokens is None else [int(t) for t in store.tokens],
        "layers": [int(layer) for layer in layers],
    }


def check_store_matches(signature: dict, store, checkpoint_path) -> None:
    """Refuse a store whose features are not the ones the checkpoint was trained on."""
    from store.meta import meta_differences

    keys = ("backbone", "protocol", "feature_dim") + (("tokens",) if signature["layers"] else ())
    differing = meta_differences(store_signature(store, []), signature, keys,
                                 names=("store", "checkpoint"))
    if differing:
        raise input_error(store.path, f"its features differ from those the checkpoint "
                          f"{checkpoint_path} was trained on: {'; '.join(differing)}")
    missing = [layer for layer in signature["layers"] if layer not in list(store.layers)]
    if missing:
        raise input_error(store.path, f"lacks intermediate layers {missing} that the checkpoint "
                          f"{checkpoint_path} reads")

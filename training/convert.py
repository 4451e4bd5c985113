"""``cli.py convert actionformer``: an official ActionFormer checkpoint + its YAML config -> a run
directory that ``cli.py infer`` uses like one of ours (head-only, EMA weights).

The YAML is read with PyYAML and completed with ActionFormer's own defaults for the keys that
matter here (``libs/core/config.py``); every option our head or post-processing cannot
reproduce is refused by name. Only ActionFormer's external classifier scores are left out on
purpose: pass them to ``infer --video-scores``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from losa_tal import TOO_DEEP, input_error, load_yaml, write_output

# ActionFormer's defaults (libs/core/config.py) for the keys read below.
DEFAULTS = {
    "dataset": {"max_seq_len": 2304, "downsample_rate": 1, "force_upsampling": False},
    "model": {"backbone_type": "convTransformer", "fpn_type": "identity",
              "backbone_arch": [2, 2, 5], "scale_factor": 2,
              "regression_range": [[0, 4], [4, 8], [8, 16], [16, 32], [32, 64], [64, 10000]],
              "n_head": 4, "n_mha_win_size": -1, "embd_kernel_size": 3, "embd_dim": 512,
              "embd_with_ln": True, "fpn_dim": 512, "fpn_with_ln": True, "head_dim": 512,
              "head_kernel_size": 3, "head_with_ln": True, "head_num_layers": 3,
              "use_abs_pe": False, "use_rel_pe": False},
    "train_cfg": {"center_sample": "radius", "center_sample_radius": 1.5, "loss_weight": 1.0,
                  "cls_prior_prob": 0.01, "init_loss_norm": 2000, "dropout": 0.1,
                  "droppath": 0.1, "label_smoothing": 0.0},
    "test_cfg": {"pre_nms_thresh": 0.001, "pre_nms_topk": 5000, "iou_threshold": 0.1,
                 "min_score": 0.01, "max_seg_num": 1000, "nms_method": "soft",
                 "nms_sigma": 0.5, "duration_thresh": 0.05, "multiclass_nms": True,
                 "voting_thresh": 0.75},
    "opt": {"learning_rate": 1e-3, "weight_decay": 0.0, "epochs": 30, "warmup_epochs": 5},
    "loader": {"batch_size": 8},
}
# (section.key, the only value we reproduce)
FIXED = [("model.backbone_type", "convTransformer"), ("model.fpn_type", "identity"),
         ("model.scale_factor", 2), ("model.embd_kernel_size", 3), ("model.head_kernel_size", 3),
         ("model.embd_with_ln", True), ("model.fpn_with_ln", True), ("model.head_with_ln", True),
         ("model.use_rel_pe", False), ("dataset.downsample_rate", 1)]


def read_actionformer_config(path) -> dict:
    """The YAML file completed with ActionFormer's defaults; a bad file is one line."""
    import yaml

    path = Path(path)
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise input_error(path, "config file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise input_error(path, f"not a readable YAML file ({str(err).splitlines()[0]})") from None
    except RecursionError:
        raise input_error(path, f"not a readable YAML file ({TOO_DEEP})") from None
    if not isinstance(raw, dict):
        raise input_error(path, "an ActionFormer config must be a YAML mapping of sections")
    merged = {}
    for section, defaults in DEFAULTS.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise input_error(path, f"{section}: expected a mapping")
        merged[section] = {**defaults, **given}
    merged["dataset_name"] = raw.get("dataset_name")
    return merged


def our_config(af: dict, path, feature_dim: int, store_path: str, annotations_path: str) -> dict:
    """Our training config (as plain data) for an ActionFormer config; refuses what we lack."""
    def get(dotted):
        section, key = dotted.split(".")
        return af[section][key]

    def refuse(dotted, why):
        raise input_error(path, f"{dotted}: {get(dotted)!r} is not supported ({why})")

    for dotted, value in FIXED:
        if get(dotted) != value:
            refuse(dotted, f"only {value!r}")
    model, train_cfg, test = af["model"], af["train_cfg"], af["test_cfg"]
    if not model["embd_dim"] == model["fpn_dim"] == model["head_dim"]:
        refuse("model.embd_dim", "embd_dim, fpn_dim and head_dim must be equal")
    if af["dataset"].get("input_dim", feature_dim) != feature_dim:
        refuse("dataset.input_dim", f"the store's features have {feature_dim} channels")
    if train_cfg["loss_weight"] <= 0:
        refuse("train_cfg.loss_weight", "automatic balancing; give a positive weight")
    if test["nms_method"] not in ("soft", "hard"):
        refuse("test_cfg.nms_method", "soft or hard")
    if abs(test["min_score"] - test["pre_nms_thresh"]) > 1e-12:
        refuse("test_cfg.min_score", "it must equal test_cfg.pre_nms_thresh")
    num_classes = af["dataset"].get("num_classes")
    if not test["multiclass_nms"] and num_classes != 1:
        refuse("test_cfg.multiclass_nms", "class-agnostic NMS over several classes; "
               "use a one-class model with infer --video-scores")
    ranges = [list(r) for r in model["regression_range"]]
    if any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])) or ranges[-1][1] < 10000:
        refuse("model.regression_range", "consecutive ranges with an open top (>= 10000)")
    arch = list(model["backbone_arch"])
    seq_len = af["dataset"]["max_seq_len"]
    resize = bool(af["dataset"]["force_upsampling"])
    head = {
        "embed_dim": model["embd_dim"], "num_levels": arch[2] + 1, "window":
            model["n_mha_win_size"], "num_heads": model["n_head"], "max_seq_len": seq_len,
        "num_embed_convs": arch[0], "num_stem_blocks": arch[1],
        "dropout": train_cfg["dropout"], "drop_path": train_cfg["droppath"],
        "tower_depth": model["head_num_layers"] - 1, "use_abs_pe": model["use_abs_pe"],
        # ActionFormer writes "no upper limit" as 10000 (checked above); we write null.
        "regression_ranges": [*ranges[:-1], [ranges[-1][0], None]],
        "center_sample_radius": (train_cfg["center_sample_radius"]
                                 if train_cfg["center_sample"] == "radius" else None),
        "cls_prior_prob": train_cfg["cls_prior_prob"],
        "reg_loss_weight": train_cfg["loss_weight"],
        "label_smoothing": train_cfg["label_smoothing"],
        "loss_norm_init": float(train_cfg["init_loss_norm"]),
    }
    voting = test["voting_thresh"] if not test["multiclass_nms"] and test["voting_thresh"] > 0 \
        else None
    return {
        "data": {"dataset": af["dataset_name"] or "actionformer", "store": store_path,
                 "annotations": annotations_path, "mode": "resize" if resize else "window",
                 "max_seq_len": seq_len, "resize_len": seq_len, "class_agnostic": num_classes == 1,
                 "crop_ratio": af["dataset"].get("crop_ratio"),
                 "min_action_inside": af["dataset"].get("trunc_thresh", 0.5)},
        "model": {"type": "head_only"},
        "head": head,
        "optim": {"lr_head": af["opt"]["learning_rate"], "weight_decay": af["opt"]["weight_decay"],
                  "warmup_epochs": af["opt"]["warmup_epochs"]},
        "train": {"epochs": math.ceil(af["opt"]["epochs"] + af["opt"]["warmup_epochs"]),
                  "batch_size": af["loader"]["batch_size"],
                  "micro_batch": af["loader"]["batch_size"]},
        "postprocess": {"score_threshold": test["pre_nms_thresh"],
                        "pre_nms_top_k": test["pre_nms_topk"],
                        "min_duration": test["duration_thresh"],
                        "nms_method": test["nms_method"], "iou_threshold": test["iou_threshold"],
                        "sigma": test["nms_sigma"], "min_score": test["min_score"],
                        "max_segments": test["max_seg_num"], "voting_iou": voting},
    }


def class_names(annotations_path, num_classes: int) -> list:
    """Class names in ActionFormer's output order: by the file's ``label_id`` where it has them
    (ActionFormer's own annotation files), else sorted."""
    from evaluation.files import read_json_object

    _, data = read_json_object(annotations_path, "annotations")  # one line for unreadable JSON
    try:
        ids = {a["label"]: a.get("label_id") for v in data["database"].values()
               for a in v.get("annotations", [])}
    except (KeyError, TypeError, AttributeError) as err:
        raise input_error(annotations_path, f"not a readable annotation file ({err})") from None
    names = sorted(ids, key=lambda name: (ids[name] is None, ids[name], name))
    if len(names) != num_classes:
        raise input_error(annotations_path, f"names {len(names)} classes, the ActionFormer "
                          f"config {num_classes}")
    return names


def convert_actionformer(checkpoint_path, config_path, store_path, out_dir,
                         annotations_path=None, storage_options=None) -> Path:
    """Write ``out_dir``/best.pt and config.json; returns the checkpoint path.
    ``storage_options`` (for a URL store) are used, never saved."""
    import torch

    from head.actionformer import load_actionformer_weights
    from training import checkpoint as ckpt
    from training.config import Config
    from training.data import AGNOSTIC_LABEL
    from training.detector import Detector
    from training.inputs import open_store

    out_dir = Path(out_dir)
    if (out_dir / "best.pt").exists() or (out_dir / "last.pt").exists():
        raise input_error(out_dir, "already holds a run; choose another `out_dir`")
    af = read_actionformer_config(config_path)
    annotations_path = str(annotations_path or af["dataset"].get("json_file") or "")
    store = open_store(store_path, af["dataset_name"] or "actionformer", storage_options)
    config = Config.from_dict(our_config(af, config_path, store.feature_dim, str(store_path),
                                         annotations_path), str(config_path))
    num_classes = af["dataset"].get("num_classes")
    classes = ([AGNOSTIC_LABEL] if config.data.class_agnostic
               else class_names(annotations_path, num_classes))
    try:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise input_error(checkpoint_path, "checkpoint not found") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise input_error(checkpoint_path, f"not a loadable checkpoint ({err})") from None
    detector = Detector(store.feature_dim, len(classes), 0, store.num_tokens, config.model,
                        config.head)
    try:
        load_actionformer_weights(detector.head, state)
    except ValueError as err:
        raise input_error(checkpoint_path, str(err)) from None
    weights = detector.state_dict()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_output(out_dir / "config.json", json.dumps(config.to_dict(), indent=2))
    path = out_dir / "best.pt"
    ckpt.save(path, {"epoch": 0, "step": 0, "model": weights, "ema": weights,
                     "optimizer": {"state": {}, "param_groups": []}, "scheduler": {"step": 0},
                     "config": config.to_dict(), "classes": classes,
                     "store": ckpt.store_signature(store, []), "best": None,
                     "converted_from": {"checkpoint": str(checkpoint_path),
                                        "config": str(config_path)}})
    return path

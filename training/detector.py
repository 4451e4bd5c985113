"""The stage-two detector: optional LoSA adapters in front of the ActionFormer-style head.

``Detector`` is the one place where the training recipe meets the ``adapt`` and ``head`` APIs:
the recipe only calls ``detector(batch)``, ``detector.loss(outputs, batch)``,
``detector.update_loss_normalizer(count)`` and ``detector.candidates(outputs, postprocess_config)``.
"""
from __future__ import annotations

import torch
from torch import nn


class Detector(nn.Module):
    """LoSA (``model.type == "losa"``) or nothing (head-only baseline), then the TAL head."""

    def __init__(self, feature_dim: int, num_classes: int, num_layers: int, num_tokens: int,
                 model_config, head_config, standardise: bool = False):
        super().__init__()
        from adapt import LoSA
        from head import ActionFormerHead

        # Per-channel feature statistics of the training split (``data.standardise``): buffers,
        # so checkpoints carry them to inference. Identity until set_standardisation is called.
        self.standardise = standardise
        if standardise:
            self.register_buffer("last_mean", torch.zeros(feature_dim))
            self.register_buffer("last_std", torch.ones(feature_dim))
            self.register_buffer("inter_mean", torch.zeros(num_layers, feature_dim))
            self.register_buffer("inter_std", torch.ones(num_layers, feature_dim))
        # The head first: its initial weights then depend on the seed alone, not on which
        # adapters draw random numbers before it, so LoSA, any of its ablations and head-only
        # start from the same head, and LoSA at step 0 *is* the head-only model of its seed.
        # (Built after the adapters, LoSA with both ranges got another head than short-only at
        # the same seed; docs/losa.md, "The collapse at training seed 1", measured the cost.)
        self.head = ActionFormerHead.from_config(feature_dim, num_classes, head_config)
        self.losa = None
        if model_config.type == "losa":
            self.losa = LoSA.from_config(feature_dim, num_layers, num_tokens, model_config.losa)

    def forward(self, batch: dict):
        features, inter = self.standardised_inputs(batch)
        if self.losa is not None:
            features = self.losa(features, inter, batch["mask"])
        return self.head(features, batch["mask"])

    @torch.no_grad()
    def set_standardisation(self, last_mean, last_std, inter_mean, inter_std) -> None:
        """Store per-channel means and stds: last layer [D], intermediate layers [L, D]."""
        for name, value in (("last_mean", last_mean), ("last_std", last_std),
                            ("inter_mean", inter_mean), ("inter_std", inter_std)):
            getattr(self, name).copy_(torch.as_tensor(value))

    def standardised_inputs(self, batch: dict):
        """The batch's last and intermediate features, standardised per channel if configured.

        Both model types go through here alike, so LoSA at initialisation (zero fusion
        projection) hands the head exactly the head-only model's input.
        """
        last, inter = batch["last"], batch["inter"]
        if not self.standardise:
            return last, inter
        last = ((last - self.last_mean) / self.last_std).to(last.dtype)
        if inter is not None:  # [B, L, T, K, D]; statistics per layer and channel
            mean = self.inter_mean[:, None, None, :]
            std = self.inter_std[:, None, None, :]
            inter = ((inter - mean) / std).to(inter.dtype)
        return last, inter

    def loss(self, outputs, batch: dict) -> dict:
        """The head's losses for a batch ("total", "cls", "reg", "num_positives").

        The head normalises by an EMA of the positive count. It stays frozen during the step;
        the recipe moves it once per step with the count of the whole global batch
        (:meth:`update_loss_normalizer`), before the step as ActionFormer does, so the update
        does not depend on how the batch was split into micro-batches and processes.
        """
        return self.head.loss(outputs, batch["targets"], update_normalizer=False)

    def count_positives(self, batch: dict) -> torch.Tensor:
        """The positive points the batch's targets give (what ``loss`` counts), without a
        forward pass: a 0-dim tensor on the device of the batch's mask."""
        return self.head.count_positives(batch["mask"], batch["targets"])

    def update_loss_normalizer(self, num_positives: float) -> None:
        self.head.update_loss_normalizer(num_positives)

    def candidates(self, outputs, postprocess_config) -> list:
        """Scored segments per sample before NMS, in sample steps (best first); NMS runs once
        per video over all its samples (training/infer.py)."""
        top_k = postprocess_config.pre_nms_top_k
        return self.head.predict(outputs, score_threshold=postprocess_config.score_threshold,
                                 pre_nms_top_k=top_k,
                                 min_duration=postprocess_config.min_duration, nms_method="none",
                                 max_segments=top_k * len(self.head.strides))


def parameter_groups(detector: Detector, lr_adapter: float, lr_head: float,
                     weight_decay: float) -> list[dict]:
    """AdamW groups: adapters and head at their own rates; no decay on biases, norms and gates.

    Only weight matrices are decayed. LoSA's gates are 3-D but are scales, like LayerNorm's:
    decaying them would pull the adapters shut rather than regularise them.
    """
    parts = [("head", detector.head, lr_head)]
    if detector.losa is not None:
        parts.insert(0, ("adapter", detector.losa, lr_adapter))
    groups = []
    for name, module, lr in parts:
        params = [(p, p.ndim >= 2 and n != "gates")
                  for n, p in module.named_parameters() if p.requires_grad]
        decayed = [p for p, decay in params if decay]
        plain = [p for p, decay in params if not decay]
        groups.append({"name": f"{name}", "params": decayed, "base_lr": lr,
                       "weight_decay": weight_decay})
        groups.append({"name": f"{name}_no_decay", "params": plain, "base_lr": lr,
                       "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def trainable_parameters(detector: Detector) -> dict:
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    return {"adapter": count(detector.losa) if detector.losa is not None else 0,
            "head": count(detector.head)}

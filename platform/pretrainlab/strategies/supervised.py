"""Supervised classification: headless timm backbone + linear head, cross-entropy with label smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.models.backbones import feature_dim
from pretrainlab.models.heads import LinearClsHead
from pretrainlab.models.init import build_backbone
from pretrainlab.models.interop import LoadReport

TASK = "classification"
DATASET_TASKS = ("classification",)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the batch.

    ``labels`` are class ids (smoothed by ``label_smoothing``) or soft targets, one row per
    image, as mixup / cutmix make them (already smoothed, so not smoothed again).
    """
    if labels.is_floating_point():
        return F.cross_entropy(logits, labels)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


class ImageClassifier(nn.Module):
    """Backbone + head; ``forward(batch)`` returns logits and, when labels are given, the loss.

    ``init_report`` says which pretrained weights the backbone started from (``model.init_from``), else ``None``.
    """

    init_report: LoadReport | None = None

    def __init__(self, backbone: nn.Module, head: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.head(self.backbone(batch["image"]))
        out = {"logits": logits}
        if "label" in batch:
            out["loss"] = classification_loss(logits, batch["label"], self.label_smoothing)
        return out


def check_dataset(cfg: ExperimentConfig, info: dict) -> None:
    """Any classification dataset will do (its labels only serve evaluation): nothing to check."""


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> ImageClassifier:
    """The classifier described by ``cfg.model`` for ``num_classes`` classes.

    The backbone starts from ``cfg.model.init_from``'s weights when set (and ``load_init_from``; pass
    ``False`` when a checkpoint of this model is loaded next), the head from scratch.

    Raises:
        InteropError: ``model.init_from`` cannot be read or does not fit the backbone.
    """
    backbone, init_report = build_backbone(cfg, in_chans, load_init_from)
    head = LinearClsHead(feature_dim(backbone), num_classes, cfg.model.head_dropout)
    model = ImageClassifier(backbone, head, cfg.model.label_smoothing)
    model.init_report = init_report
    return model

"""Evaluation protocols of self-supervised checkpoints on frozen backbone features: kNN and the linear probe.

Features are extracted once per split (evaluation preprocessing, backbone in eval mode); the
linear probe then trains a linear classifier for many epochs on the cached features, standardised
with the training split's mean and std, and keeps the epoch with the best validation top-1.

Which features: ``pooled`` is the backbone's own output (a ResNet's average pool, a ViT's class
token); ``last-blocks`` is DINO's linear-evaluation protocol for ViTs, the class token after each of
the last N blocks concatenated with the mean patch token of the last block.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pretrainlab.checkpoint import CheckpointError
from pretrainlab.config import DataConfig
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.dataset import load_split_numpy
from pretrainlab.evaluation.classification import eval_batches
from pretrainlab.inference.loading import LoadedModel, load_model
from pretrainlab.metrics.classification import evaluate_logits
from pretrainlab.metrics.knn import knn_top1

FEATURE_KINDS = ("pooled", "last-blocks")
KNN_KS = (20, 200)
"""Neighbour counts of the kNN evaluation of a finished run (the InstDisc / DINO protocol)."""
KNN_TEMPERATURE = 0.07
"""Temperature of the kNN votes."""
KNN_BANK_SPLIT = "train"
"""The split whose features are the kNN bank; queries from it are scored leave-one-out."""
VALIDATION_K = 20
"""Neighbours of the leave-one-out kNN validation each epoch."""


class FeatureError(ValueError):
    """The requested features cannot be taken from this backbone."""


class LastBlocksFeatures(nn.Module):
    """DINO's linear-evaluation features of a timm ViT: the class token after each of the last ``blocks``
    blocks (final norm applied) and the mean patch token of the last block, concatenated."""

    def __init__(self, vit: nn.Module, blocks: int) -> None:
        super().__init__()
        if not (hasattr(vit, "forward_intermediates") and getattr(vit, "has_class_token", False)):
            raise FeatureError(f"last-blocks features need a timm ViT with a class token, not {type(vit).__name__}")
        depth = len(vit.blocks)
        if not 1 <= blocks <= depth:
            raise FeatureError(
                f"last-blocks features: blocks must be between 1 and the ViT's depth {depth}, got {blocks}"
            )
        self.vit, self.blocks = vit, blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = self.vit.forward_intermediates(
            images, self.blocks, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True
        )
        class_tokens = [prefix[:, 0] for _, prefix in outputs]
        return torch.cat([*class_tokens, outputs[-1][0].mean(dim=1)], dim=1)


def feature_extractor(backbone: nn.Module, kind: str = "pooled", blocks: int = 4) -> nn.Module:
    """The module whose output is the ``kind`` of features of ``backbone`` (one of ``FEATURE_KINDS``)."""
    if kind == "pooled":
        return backbone
    if kind == "last-blocks":
        return LastBlocksFeatures(backbone, blocks)
    raise FeatureError(f"unknown features {kind!r}; choose from {', '.join(FEATURE_KINDS)}")


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: np.ndarray,
    cfg: DataConfig,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``N x D`` float features of uint8 ``N x C x H x W`` images through the evaluation pipeline."""
    backbone.eval()
    return torch.cat(
        [backbone(batch).float().flatten(1).cpu() for batch in eval_batches(images, cfg, batch_size, device)]
    )


@dataclass
class CheckpointFeatures:
    """A checkpoint's model and its backbone features (with labels) of some splits of its dataset."""

    loaded: LoadedModel
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_classes(self) -> int:
        return len(self.loaded.class_names)


def backbone_of(loaded: LoadedModel) -> nn.Module:
    """The ``backbone`` module of a loaded model (every strategy keeps one)."""
    backbone = getattr(loaded.model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise CheckpointError(f"{loaded.checkpoint_dir}: {type(loaded.model).__name__} has no backbone module")
    return backbone


def checkpoint_features(
    source: str | os.PathLike | LoadedModel,
    splits: Iterable[str],
    data_folder: str | None = None,
    batch_size: int = 512,
    kind: str = "pooled",
    blocks: int = 4,
) -> CheckpointFeatures:
    """Backbone features (``kind``, see ``feature_extractor``) of each of ``splits`` of the checkpoint's
    dataset (or ``data_folder``), extracted once.

    Raises:
        CheckpointError: the checkpoint cannot be fetched or loaded.
        FeatureError: the backbone has no features of that kind.
        DatasetError: a split is unknown or its shards are damaged (checked before any features are computed).
    """
    loaded = source if isinstance(source, LoadedModel) else load_model(source)
    backbone = feature_extractor(backbone_of(loaded), kind, blocks)
    folder = data_folder or dataset_dir(loaded.config)
    arrays = {split: load_split_numpy(folder, split) for split in dict.fromkeys(splits)}
    features = {
        split: (extract_features(backbone, images, loaded.config.data, batch_size), torch.from_numpy(labels))
        for split, (images, labels) in arrays.items()
    }
    return CheckpointFeatures(loaded, features)


def knn_accuracies(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    ks: Iterable[int],
    temperature: float = KNN_TEMPERATURE,
    exclude_self: bool = False,
) -> dict[int, float]:
    """kNN top-1 in percent for each ``k`` (``exclude_self``: the queries are the bank, leave-one-out)."""
    return {
        k: knn_top1(queries, query_labels, bank, bank_labels, num_classes, k, temperature, exclude_self) for k in ks
    }


@dataclass
class ProbeHistory:
    """Per-epoch training loss and validation top-1 of a linear probe, and the epoch kept (1-based)."""

    train_loss: list[float] = field(default_factory=list)
    val_top1: list[float] = field(default_factory=list)
    best_epoch: int = 0

    @property
    def best_val_top1(self) -> float:
        return self.val_top1[self.best_epoch - 1]


def _standardization(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (constant features get std 1)."""
    std = feats.std(dim=0)
    return feats.mean(dim=0), torch.where(std > 1e-6, std, torch.ones_like(std))


def _top1(linear: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (linear(feats).argmax(1) == labels).float().mean().item()


def _fold_standardization(linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """The linear layer on raw features equal to ``linear`` on ``(x - mean) / std``."""
    raw = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        raw.weight.copy_(linear.weight / std)
        raw.bias.copy_(linear.bias - raw.weight @ mean)
    return raw


def train_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[nn.Linear, ProbeHistory]:
    """A linear classifier on frozen features: SGD (Nesterov momentum 0.9) with a per-step cosine schedule,
    zero-initialised.

    Features are standardised with the training features' mean and std while training; the returned
    layer has that folded in, so it takes raw features. It holds the weights of the epoch with the best
    validation top-1 (the latest on ties: the most trained).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    mean, std = _standardization(train_feats.float())
    train_x, val_x = (train_feats.float() - mean) / std, (val_feats.float() - mean) / std
    linear = nn.Linear(train_x.shape[1], num_classes)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    history, best = ProbeHistory(), None
    for epoch in range(1, epochs + 1):
        order, total = torch.randperm(len(train_x), generator=generator), 0.0
        for start in range(0, len(train_x), batch_size):
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(linear(train_x[rows]), train_labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(rows)
        history.train_loss.append(total / len(train_x))
        history.val_top1.append(_top1(linear, val_x, val_labels))
        if best is None or history.val_top1[-1] >= history.best_val_top1:
            history.best_epoch = epoch
            best = {k: v.detach().clone() for k, v in linear.state_dict().items()}
    linear.load_state_dict(best)
    return _fold_standardization(linear, mean, std), history


def evaluate_probe(linear: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) of a trained probe on raw features."""
    with torch.no_grad():
        return evaluate_logits(linear(feats.float()), labels)

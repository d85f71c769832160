"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of two views' projections is pushed to the identity.

Backbone + projector (3 layers). Each projection feature is standardised over the global batch (every
worker's rows) and ``C = z1_norm^T z2_norm / N`` is summed over workers, so N workers compute the loss of
their concatenated batch. Every worker gets the same loss; the collectives' backward sums every worker's
gradient, and DDP's mean over workers then gives the gradient of that one loss.
"""

from __future__ import annotations

import torch
import torch.distributed.nn.functional as dist_fn
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.distributed import distributed, rank_and_world
from pretrainlab.models.backbones import feature_dim
from pretrainlab.models.heads import MLPHead
from pretrainlab.models.init import build_backbone
from pretrainlab.models.interop import LoadReport
from pretrainlab.strategies.common import check_two_views
from pretrainlab.strategy_params import BarlowTwinsParams

TASK = "embedding"
DATASET_TASKS = ("classification",)

EPS = 1e-5
"""Added to each feature's variance before dividing by its square root (BatchNorm's default)."""


def _sum_over_workers(tensor: torch.Tensor) -> torch.Tensor:
    return dist_fn.all_reduce(tensor) if distributed() else tensor


def standardize(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``(z - mean) / sqrt(var + eps)`` per feature (column), mean and biased variance over every worker's rows.

    Every worker must pass the same number of rows.
    """
    rows = z.shape[0] * rank_and_world()[1]
    centred = z - _sum_over_workers(z.sum(dim=0)) / rows
    variance = _sum_over_workers(centred.square().sum(dim=0)) / rows
    return centred / torch.sqrt(variance + eps)


def cross_correlation(z1: torch.Tensor, z2: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``C = standardize(z1)^T standardize(z2) / N`` (D x D), N the rows of all workers together."""
    z1, z2 = z1.float(), z2.float()
    rows = z1.shape[0] * rank_and_world()[1]
    return _sum_over_workers(standardize(z1, eps).T @ standardize(z2, eps)) / rows


def invariance_term(c: torch.Tensor) -> torch.Tensor:
    """``sum_i (1 - C_ii)^2``: how far each feature is from agreeing perfectly across the two views."""
    return (1 - torch.diagonal(c)).square().sum()


def redundancy_term(c: torch.Tensor) -> torch.Tensor:
    """``sum_{i != j} C_ij^2``: how much different features correlate."""
    return c.square().sum() - torch.diagonal(c).square().sum()


def barlow_twins_loss(c: torch.Tensor, off_diagonal_weight: float) -> torch.Tensor:
    """``sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2`` for the cross-correlation ``c``, lambda the weight."""
    return invariance_term(c) + off_diagonal_weight * redundancy_term(c)


class BarlowTwins(nn.Module):
    """Backbone + projector, the same network for both views."""

    init_report: LoadReport | None = None

    def __init__(
        self, backbone: nn.Module, projector: nn.Module, off_diagonal_weight: float, loss_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.off_diagonal_weight = off_diagonal_weight
        self.loss_scale = loss_scale

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z1 = self.projector(self.backbone(batch["view0"]))
        z2 = self.projector(self.backbone(batch["view1"]))
        c = cross_correlation(z1, z2)
        return {
            "loss": self.loss_scale * barlow_twins_loss(c, self.off_diagonal_weight),
            "log/invariance": invariance_term(c.detach()),
            "log/redundancy": redundancy_term(c.detach()),
        }


def check_dataset(cfg: ExperimentConfig, info: dict) -> None:
    """Any classification dataset will do (its labels only serve evaluation): nothing to check."""


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> BarlowTwins:
    """Barlow Twins on ``cfg.model``'s backbone (``num_classes`` is unused: no labels).

    Raises:
        ValueError: ``data.views`` does not make 2 views per image.
    """
    check_two_views(cfg)
    params = BarlowTwinsParams.model_validate(cfg.strategy_params)
    backbone, init_report = build_backbone(cfg, in_chans, load_init_from)
    projector = MLPHead(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim, num_layers=3)
    weight = params.off_diagonal_weight if params.off_diagonal_weight is not None else 1 / params.proj_dim
    model = BarlowTwins(backbone, projector, weight, params.loss_scale)
    model.init_report = init_report
    return model

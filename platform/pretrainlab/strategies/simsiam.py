"""SimSiam (Chen & He 2021): each view's prediction matches the other view's projection, under stop-gradient.

Backbone + projector (3 layers, BatchNorm after the last) + bottleneck predictor (2 layers). Like BYOL
without the momentum encoder: the stop-gradient alone keeps the features from collapsing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.models.backbones import feature_dim
from pretrainlab.models.heads import MLPHead
from pretrainlab.models.init import build_backbone
from pretrainlab.models.interop import LoadReport
from pretrainlab.strategies.common import check_two_views
from pretrainlab.strategy_params import SimSiamParams

TASK = "embedding"
DATASET_TASKS = ("classification",)


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """``-(mean cos(p1, sg(z2)) + mean cos(p2, sg(z1))) / 2``, ``sg`` the stop-gradient; from -1 (aligned) to 1.

    ``p1``, ``p2``: predictions of views 1 and 2; ``z1``, ``z2``: their projections.
    """
    aligned_1 = F.cosine_similarity(p1.float(), z2.detach().float(), dim=-1).mean()
    aligned_2 = F.cosine_similarity(p2.float(), z1.detach().float(), dim=-1).mean()
    return -0.5 * (aligned_1 + aligned_2)


class SimSiam(nn.Module):
    """Backbone + projector + predictor, the same network for both views.

    Logs ``z_std``, the per-feature std of the unit-length projections: near ``1 / sqrt(proj_dim)`` while
    they spread, 0 when they collapse (the paper's collapse check).
    """

    init_report: LoadReport | None = None

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z1 = self.projector(self.backbone(batch["view0"]))
        z2 = self.projector(self.backbone(batch["view1"]))
        loss = simsiam_loss(self.predictor(z1), self.predictor(z2), z1, z2)
        return {"loss": loss, "log/z_std": F.normalize(z1.detach().float(), dim=-1).std(dim=0).mean()}


def check_dataset(cfg: ExperimentConfig, info: dict) -> None:
    """Any classification dataset will do (its labels only serve evaluation): nothing to check."""


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> SimSiam:
    """SimSiam on ``cfg.model``'s backbone (``num_classes`` is unused: no labels).

    Raises:
        ValueError: ``data.views`` does not make 2 views per image.
    """
    check_two_views(cfg)
    params = SimSiamParams.model_validate(cfg.strategy_params)
    backbone, init_report = build_backbone(cfg, in_chans, load_init_from)
    projector = MLPHead(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim, num_layers=3, last_bn=True)
    predictor = MLPHead(params.proj_dim, params.pred_hidden_dim, params.proj_dim)
    model = SimSiam(backbone, projector, predictor)
    model.init_report = init_report
    return model

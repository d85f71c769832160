"""BYOL (Grill et al. 2020): an online network predicts a momentum target network's projection of another view.

Online: backbone + projector + predictor; target: a momentum copy of backbone + projector (``target.*``
in the state dict, so fine-tuning, which loads ``backbone.*``, keeps the online encoder). No negatives;
the predictor and the slowly moving target keep the features from collapsing.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.models.backbones import feature_dim
from pretrainlab.models.heads import MLPHead
from pretrainlab.models.init import build_backbone
from pretrainlab.models.interop import LoadReport
from pretrainlab.strategies.common import check_two_views, cosine_momentum, frozen_copy, momentum_update
from pretrainlab.strategy_params import ByolParams

TASK = "embedding"
DATASET_TASKS = ("classification",)


def normalized_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_n (2 - 2 cos(p_n, z_n))``: the squared distance of the unit vectors; no gradient reaches ``target``."""
    return (2 - 2 * F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1)).mean()


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The symmetric BYOL loss ``normalized_mse(p1, z2) + normalized_mse(p2, z1)``.

    ``p1``, ``p2``: online predictions of views 1 and 2; ``z1``, ``z2``: target projections (stop-gradient).
    """
    return normalized_mse(p1, z2) + normalized_mse(p2, z1)


class BYOL(nn.Module):
    """Online backbone + projector + predictor and the momentum ``target`` (backbone + projector)."""

    init_report: LoadReport | None = None

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module, params: ByolParams) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.target = frozen_copy(nn.Sequential(OrderedDict(backbone=backbone, projector=projector)))
        self.base_momentum = params.base_momentum
        self.final_momentum = params.final_momentum
        self.momentum = params.base_momentum

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(images)))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        view1, view2 = batch["view0"], batch["view1"]
        p1, p2 = self._predict(view1), self._predict(view2)
        with torch.no_grad():
            z1, z2 = self.target(view1), self.target(view2)
        return {"loss": byol_loss(p1, p2, z1, z2), "log/momentum": self.momentum}

    def after_step(self, step: int, total_steps: int | None) -> None:
        """Move the target towards the online network with the momentum of BYOL's cosine schedule
        (``base_momentum`` throughout when ``total_steps`` is unknown)."""
        if total_steps is not None:
            self.momentum = cosine_momentum(step, total_steps, self.base_momentum, self.final_momentum)
        momentum_update(self.backbone, self.target.backbone, self.momentum)
        momentum_update(self.projector, self.target.projector, self.momentum)


def check_dataset(cfg: ExperimentConfig, info: dict) -> None:
    """Any classification dataset will do (its labels only serve evaluation): nothing to check."""


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> BYOL:
    """BYOL on ``cfg.model``'s backbone (``num_classes`` is unused: no labels).

    Raises:
        ValueError: ``data.views`` does not make 2 views per image.
    """
    check_two_views(cfg)
    params = ByolParams.model_validate(cfg.strategy_params)
    backbone, init_report = build_backbone(cfg, in_chans, load_init_from)
    projector = MLPHead(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim)
    predictor = MLPHead(params.proj_dim, params.proj_hidden_dim, params.proj_dim)
    model = BYOL(backbone, projector, predictor, params)
    model.init_report = init_report
    return model

"""MoCo v3 (Chen, Xie & He 2021): a query encoder with a predictor against a momentum key encoder.

The base encoder is backbone + projector (3 layers, last BatchNorm) + predictor (2 layers); the
momentum encoder is a frozen copy of backbone + projector that follows it with a cosine momentum
schedule (:meth:`MoCoV3.after_step`). Keys come from every worker (no gradient); the loss is
symmetric over the two views. Works with CNN and ViT backbones alike (it only needs pooled features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.distributed import gather_with_grad, rank_and_world
from pretrainlab.models.backbones import feature_dim
from pretrainlab.models.heads import MLPHead
from pretrainlab.models.init import build_backbone
from pretrainlab.models.interop import LoadReport
from pretrainlab.strategies.common import check_two_views, cosine_momentum, frozen_copy, momentum_update
from pretrainlab.strategy_params import MocoV3Params

TASK = "embedding"
DATASET_TASKS = ("classification",)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's ``ctr(q, k)``, scaled by ``2 t`` as in the paper.

    With ``q`` this worker's ``N`` queries and ``K`` the keys of every worker (``M`` rows, no gradient),
    all L2-normalised, query ``i``'s loss is ``-2t log(exp(q_i . K_p / t) / sum_j exp(q_i . K_j / t))``
    where ``p = rank * N + i`` is its own image's key; the mean over this worker's queries.
    """
    rank, _ = rank_and_world()
    q = F.normalize(q, dim=1)
    keys = gather_with_grad(F.normalize(k.detach(), dim=1))
    logits = q @ keys.T / temperature
    positives = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return F.cross_entropy(logits, positives) * (2 * temperature)


class MoCoV3(nn.Module):
    """Online ``backbone`` + ``projector`` + ``predictor``, and ``momentum_encoder`` (backbone + projector)."""

    init_report: LoadReport | None = None

    def __init__(
        self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module, temperature: float, base_momentum: float
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.momentum_encoder = frozen_copy(self.online_encoder())
        self.temperature = temperature
        self.base_momentum = base_momentum
        self.momentum = base_momentum

    def online_encoder(self) -> nn.Sequential:
        """Backbone + projector: the part of the model the momentum encoder follows."""
        return nn.Sequential(self.backbone, self.projector)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoder = self.online_encoder()
        q1, q2 = (self.predictor(encoder(batch[view])) for view in ("view0", "view1"))
        with torch.no_grad():
            k1, k2 = (self.momentum_encoder(batch[view]) for view in ("view0", "view1"))
        loss = contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)
        return {"loss": loss, "log/momentum": self.momentum}

    def after_step(self, step: int, total_steps: int | None) -> None:
        """Move the momentum encoder towards the online one with the cosine schedule's momentum at ``step``.

        Without ``total_steps`` the momentum stays where it is (``base_momentum`` at first).
        """
        if total_steps is not None:
            self.momentum = cosine_momentum(step, total_steps, self.base_momentum, 1.0)
        momentum_update(self.online_encoder(), self.momentum_encoder, self.momentum)


def check_dataset(cfg: ExperimentConfig, info: dict) -> None:
    """Any classification dataset will do (its labels only serve evaluation): nothing to check."""


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> MoCoV3:
    """MoCo v3 on ``cfg.model``'s backbone; ``num_classes`` is unused (no labels).

    Raises:
        ValueError: ``data.views`` does not give two views.
    """
    check_two_views(cfg)
    params = MocoV3Params.model_validate(cfg.strategy_params)
    backbone, init_report = build_backbone(cfg, in_chans, load_init_from)
    projector = MLPHead(
        feature_dim(backbone), params.proj_hidden_dim, params.proj_dim, params.proj_layers, last_bn=True
    )
    predictor = MLPHead(params.proj_dim, params.pred_hidden_dim, params.proj_dim, params.pred_layers)
    model = MoCoV3(backbone, projector, predictor, params.temperature, params.base_momentum)
    model.init_report = init_report
    return model

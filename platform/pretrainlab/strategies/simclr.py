"""SimCLR (Chen et al. 2020): two views of each image, an MLP projector, the NT-Xent loss over the global batch.

Each worker's embeddings are gathered from every worker with their gradient, so each image's
negatives are the other 2 x (global batch - 1) views, as in the paper's large-batch training.
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
from pretrainlab.strategies.common import check_two_views
from pretrainlab.strategy_params import SimClrParams

TASK = "embedding"
DATASET_TASKS = ("classification",)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the global batch; this worker's rows, averaged.

    With ``u`` the L2-normalised embeddings of both views of every worker's images (``2M`` rows),
    the loss of view ``i`` with positive ``p(i)`` (the other view of its image) is
    ``-log(exp(u_i . u_p(i) / t) / sum_{k != i} exp(u_i . u_k / t))``. Each worker returns the mean over
    its own ``2N`` views, so the mean over workers is the loss of the whole batch; ``z1[j]`` and ``z2[j]``
    are the two views of image ``j`` (``N x D`` each, the same ``N`` on every worker).
    """
    rank, world = rank_and_world()
    n = z1.shape[0]
    queries = F.normalize(torch.cat([z1, z2]), dim=1)
    keys = torch.cat([gather_with_grad(queries[:n]), gather_with_grad(queries[n:])])
    logits = queries @ keys.T / temperature
    own = torch.arange(n, device=z1.device) + rank * n
    self_columns = torch.cat([own, own + world * n])
    positive_columns = torch.cat([own + world * n, own])
    rows = torch.arange(2 * n, device=z1.device)
    logits[rows, self_columns] = float("-inf")
    return F.cross_entropy(logits, positive_columns)


class SimCLR(nn.Module):
    """Backbone + projector; ``forward`` embeds ``view0`` and ``view1`` in one pass and returns the NT-Xent loss."""

    init_report: LoadReport | None = None

    def __init__(self, backbone: nn.Module, projector: nn.Module, temperature: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.temperature = temperature

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = torch.cat([batch["view0"], batch["view1"]])
        z1, z2 = self.projector(self.backbone(images)).chunk(2)
        loss = nt_xent(z1, z2, self.temperature)
        positive_cosine = F.cosine_similarity(z1.detach(), z2.detach()).mean()
        return {"loss": loss, "log/positive_cosine": positive_cosine}


def check_dataset(cfg: ExperimentConfig, info: dict) -> None:
    """Any classification dataset will do (its labels only serve evaluation): nothing to check."""


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> SimCLR:
    """SimCLR on ``cfg.model``'s backbone; ``num_classes`` is unused (no labels).

    Raises:
        ValueError: ``data.views`` does not give two views.
    """
    check_two_views(cfg)
    params = SimClrParams.model_validate(cfg.strategy_params)
    backbone, init_report = build_backbone(cfg, in_chans, load_init_from)
    projector = MLPHead(feature_dim(backbone), params.proj_hidden_dim, params.proj_dim, params.proj_layers)
    model = SimCLR(backbone, projector, params.temperature)
    model.init_report = init_report
    return model

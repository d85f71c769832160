"""CLIP (Radford et al. 2021): an image tower and a text tower trained to agree, contrastively, over the global batch.

The image tower is ``cfg.model``'s timm backbone with a linear projection; the text tower is
open_clip's causal text transformer over the CLIP BPE vocabulary. The loss is open_clip's
``ClipLoss``: each worker's embeddings are gathered from every worker with their gradient, so
every image is contrasted with every text of the global batch, at a learnable temperature
(a logit scale kept at or below ``max_logit_scale`` after every step, as in the paper).
Trains on caption or retrieval datasets, one caption per image drawn at random each epoch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from pydantic import Field
from torch import nn

from pretrainlab.config import ExperimentConfig, StrategyParams
from pretrainlab.models.backbones import feature_dim
from pretrainlab.models.init import build_backbone
from pretrainlab.models.interop import LoadReport
from pretrainlab.models.text import build_text_tower
from pretrainlab.strategies.common import rank_and_world

TASK = "image_text"
DATASET_TASKS = ("retrieval", "caption")


class Params(StrategyParams):
    """``strategy_params`` of CLIP."""

    embed_dim: int = Field(256, ge=1, description="Width of the joint image-text embedding space.")
    text_width: int = Field(256, ge=1, description="Width of the text transformer.")
    text_layers: int = Field(4, ge=1, description="Blocks of the text transformer.")
    text_heads: int = Field(4, ge=1, description="Attention heads of the text transformer (divides text_width).")
    init_temperature: float = Field(0.07, gt=0, description="Softmax temperature at the start (learned).")
    max_logit_scale: float = Field(100.0, gt=1, description="Upper bound of 1 / temperature.")


class CLIP(nn.Module):
    """Image tower (``backbone`` + ``visual_proj``) and text tower; ``forward`` returns the contrastive loss."""

    init_report: LoadReport | None = None

    def __init__(self, backbone: nn.Module, text: nn.Module, params: Params) -> None:
        super().__init__()
        self.backbone = backbone
        self.visual_proj = nn.Linear(feature_dim(backbone), params.embed_dim, bias=False)
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / params.init_temperature)))
        self.max_log_scale = math.log(params.max_logit_scale)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``N x embed_dim`` embeddings of normalised images."""
        return F.normalize(self.visual_proj(self.backbone(images)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``N x embed_dim`` embeddings of token ids (``N x context_length``)."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, texts = self.encode_image(batch["image"]), self.encode_text(batch["text"])
        rank, world = rank_and_world()
        loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        scale = self.logit_scale.exp()
        return {
            "loss": loss_fn(images, texts, scale),
            "log/logit_scale": scale.detach(),
            "log/positive_cosine": (images.detach() * texts.detach()).sum(dim=1).mean(),
        }

    def after_step(self, step: int, total_steps: int) -> None:
        """Keeps the logit scale in ``[0, log(max_logit_scale)]``."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, self.max_log_scale)


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> CLIP:
    """CLIP with ``cfg.model``'s backbone as image tower; ``num_classes`` is unused.

    Raises:
        ValueError: ``text_width`` is not a multiple of ``text_heads``.
    """
    params = Params.model_validate(cfg.strategy_params)
    backbone, init_report = build_backbone(cfg, in_chans, load_init_from)
    text = build_text_tower(
        cfg.data.context_length, params.text_width, params.text_layers, params.text_heads, params.embed_dim
    )
    model = CLIP(backbone, text, params)
    model.init_report = init_report
    return model

"""CLIP (Radford et al. 2021): an image tower and a text tower trained to agree, contrastively, over the global batch.

The image tower is ``cfg.model``'s timm backbone with a linear projection of its pooled features,
or (``image_pool: attention``) CLIP's attention pooling of its feature map, which keeps where
things are (timm's ``AttentionPool2d``: a learned position embedding, the mean feature as query
over every position, then the projection); the text tower is
open_clip's causal text transformer over the CLIP BPE vocabulary. The loss is open_clip's
``ClipLoss``: each worker's embeddings are gathered from every worker with their gradient, so
every image is contrasted with every text of the global batch, at a learnable temperature
(a logit scale kept at or below ``max_logit_scale`` after every step, as in the paper).
With ``hard_negatives`` (NegCLIP, Yuksekgonul et al. 2023) each image is also ranked against
every hard-negative caption of the global batch (retrieval rows' ``negatives``: the caption with
one attribute, relation or count changed), which teaches which attribute goes with which object.
Trains on caption or retrieval datasets, one caption per image drawn at random each epoch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from timm.layers import AttentionPool2d
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.data.errors import DatasetError
from pretrainlab.distributed import gather_with_grad, rank_and_world
from pretrainlab.models.backbones import feature_dim
from pretrainlab.models.init import build_backbone
from pretrainlab.models.interop import LoadReport
from pretrainlab.models.text import build_text_tower, filled_length
from pretrainlab.strategy_params import ClipParams

TASK = "image_text"
DATASET_TASKS = ("retrieval", "caption")


def contrastive_loss(
    images: torch.Tensor,
    texts: torch.Tensor,
    scale: torch.Tensor,
    negatives: torch.Tensor | None = None,
    has_negative: torch.Tensor | None = None,
) -> torch.Tensor:
    """open_clip's ``ClipLoss`` over the global batch of L2-normalised embeddings, at logit scale ``scale``.

    With ``negatives`` (``N x D`` hard-negative text embeddings, one per row, ``has_negative`` marking the rows
    that have one), the image->text cross-entropy also ranks every worker's hard negatives (NegCLIP); the
    text->image side is unchanged.
    """
    rank, world = rank_and_world()
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    if negatives is None:
        return loss_fn(images, texts, scale)
    logits_per_image, logits_per_text = loss_fn.get_logits(images, texts, scale)
    present = gather_with_grad(has_negative.to(images.dtype)) > 0
    negative_logits = (scale * images @ gather_with_grad(negatives).T).masked_fill(~present, float("-inf"))
    logits_per_image = torch.cat([logits_per_image, negative_logits], dim=1)
    labels = loss_fn.get_ground_truth(images.device, logits_per_image.shape[0])
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class CLIP(nn.Module):
    """Image tower (``backbone`` + ``visual_proj``) and text tower; ``forward`` returns the contrastive loss."""

    init_report: LoadReport | None = None

    def __init__(self, backbone: nn.Module, text: nn.Module, params: ClipParams) -> None:
        super().__init__()
        self.backbone = backbone
        self.attention_pool = params.image_pool == "attention"
        if self.attention_pool:  # over forward_features: num_features channels, 8 heads where they divide them
            width = backbone.num_features
            heads = next(h for h in (8, 4, 2, 1) if width % h == 0)
            self.visual_proj = AttentionPool2d(
                width, params.feature_grid, out_features=params.embed_dim, num_heads=heads
            )
        else:
            self.visual_proj = nn.Linear(feature_dim(backbone), params.embed_dim, bias=False)
        self.text = text
        self.hard_negatives = params.hard_negatives
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / params.init_temperature)))
        self.max_log_scale = math.log(params.max_logit_scale)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``N x embed_dim`` embeddings of normalised images."""
        features = self.backbone.forward_features(images) if self.attention_pool else self.backbone(images)
        return F.normalize(self.visual_proj(features), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``N x embed_dim`` embeddings of token ids (``N x context_length``)."""
        return F.normalize(self.text(tokens[:, : filled_length(tokens)]), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, texts = self.encode_image(batch["image"]), self.encode_text(batch["text"])
        scale = self.logit_scale.exp()
        negatives = has_negative = None
        if self.hard_negatives:
            if "negative_text" not in batch:  # check_dataset refuses such datasets before training
                raise ValueError("strategy_params.hard_negatives: the batch has no hard-negative captions")
            negatives, has_negative = self.encode_text(batch["negative_text"]), batch["negative_text"].any(dim=1)
        return {
            "loss": contrastive_loss(images, texts, scale, negatives, has_negative),
            "log/logit_scale": scale.detach(),
            "log/positive_cosine": (images.detach() * texts.detach()).sum(dim=1).mean(),
        }

    def after_step(self, step: int, total_steps: int) -> None:
        """Keeps the logit scale in ``[0, log(max_logit_scale)]``."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, self.max_log_scale)


def check_dataset(cfg: ExperimentConfig, info: dict) -> None:
    """Raises ``DatasetError`` when ``hard_negatives`` is set and the dataset has no hard-negative captions."""
    if ClipParams.model_validate(cfg.strategy_params).hard_negatives and info["task"] != "retrieval":
        raise DatasetError(
            f"strategy_params.hard_negatives: {cfg.data.dataset} is a {info['task']} dataset, without hard-negative "
            "captions; train on a retrieval dataset or set hard_negatives: false"
        )


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> CLIP:
    """CLIP with ``cfg.model``'s backbone as image tower; ``num_classes`` is unused.

    Raises:
        ValueError: ``text_width`` is not a multiple of ``text_heads``, or ``image_pool: attention`` on a
            backbone without a 2-D feature map.
    """
    params = ClipParams.model_validate(cfg.strategy_params)
    backbone, init_report = build_backbone(cfg, in_chans, load_init_from)
    if params.image_pool == "attention" and hasattr(backbone, "patch_embed"):
        raise ValueError(
            f"strategy_params.image_pool: attention pools a convolutional feature map; {cfg.model.backbone} "
            "pools its own tokens, use image_pool: avg"
        )
    text = build_text_tower(
        cfg.data.context_length, params.text_width, params.text_layers, params.text_heads, params.embed_dim
    )
    model = CLIP(backbone, text, params)
    model.init_report = init_report
    return model

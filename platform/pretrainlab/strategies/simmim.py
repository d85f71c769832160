"""SimMIM (Xie et al., 2022): a ViT sees every patch, the masked ones as a learned token; a linear head predicts pixels.

    strategy: simmim
    data:
      mask: {kind: block, ratio: 0.6, patch_size: 4}   # patch_size = the ViT's patch size

The encoder is ``backbone``, a headless timm ``VisionTransformer``. The patch embeddings of masked
patches are replaced by a learned mask token before the position embeddings are added; every token
then goes through the blocks and the final norm, and one ``Linear`` maps each patch token to its
``patch_size^2 * channels`` pixels. The loss is the L1 distance on the masked patches' pixels only.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.models.init import build_backbone
from pretrainlab.models.interop import LoadReport
from pretrainlab.strategies.mae import (
    check_batch,
    check_vit_masking,
    embed_patches,
    encode_tokens,
    fill_masked,
    patch_positions,
    patchify,
    prefix_tokens,
    vit_patch_size,
)
from pretrainlab.strategy_params import SimMimParams

TASK = "embedding"
DATASET_TASKS = ("classification",)


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_{masked patches i, values d} |pred_id - target_id| / (#masked * D)``: the mean L1 over masked pixels.

    Args:
        pred, target: ``N x L x D`` patches (``D = p * p * C`` pixel values).
        mask: ``N x L`` bool, True where the patch was masked.
    """
    weight = mask.to(pred.dtype).unsqueeze(-1)
    return ((pred - target).abs() * weight).sum() / (weight.sum() * pred.shape[-1]).clamp_min(1)


def mask_patches(tokens: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """``N x L x D`` tokens with ``mask_token`` (``D``) where ``mask`` (``N x L``) is True."""
    return torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)


class SimMIM(nn.Module):
    """``backbone`` (the kept ViT) with a mask token and a linear pixel head; ``forward`` returns the L1 loss."""

    init_report: LoadReport | None = None

    def __init__(self, backbone: VisionTransformer, in_chans: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size = vit_patch_size(backbone)
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))
        self.head = nn.Linear(backbone.embed_dim, self.patch_size**2 * in_chans)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch, ``N x L x (p * p * C)``."""
        check_batch(self.backbone, images, mask)
        patches = mask_patches(embed_patches(self.backbone, images), mask.flatten(1), self.mask_token)
        prefix = prefix_tokens(self.backbone, images.shape[0])
        x = encode_tokens(self.backbone, prefix, patches + patch_positions(self.backbone))
        return self.head(x[:, prefix.shape[1] :])

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, mask = batch["image"], batch["mask"]
        pred = self.predict(images, mask)
        loss = masked_l1_loss(pred, patchify(images, self.patch_size), mask.flatten(1))
        return {"loss": loss}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images whose masked patches are the model's predictions and visible patches the input's."""
        return fill_masked(images, self.predict(images, mask), mask, self.patch_size)


def check_dataset(cfg: ExperimentConfig, info: dict) -> None:
    """Any classification dataset will do (its labels only serve evaluation): nothing to check."""


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> SimMIM:
    """SimMIM on ``cfg.model``'s ViT (``num_classes`` unused: no labels).

    Raises:
        ValueError: The backbone is not a timm ViT, or ``data.mask`` / ``data.views`` / the crop size do not fit it.
    """
    SimMimParams.model_validate(cfg.strategy_params)
    backbone, init_report = build_backbone(cfg, in_chans, load_init_from)
    check_vit_masking(cfg, backbone, "simmim")
    model = SimMIM(backbone, in_chans)
    model.init_report = init_report
    return model

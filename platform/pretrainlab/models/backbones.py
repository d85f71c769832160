"""Headless timm backbones, with the small-input stem adaptation as an explicit option."""

from __future__ import annotations

import difflib

import timm
from torch import nn

from pretrainlab.config import ModelConfig


class BackboneError(ValueError):
    """The configured backbone cannot be built."""


def _use_small_input_stem(model: nn.Module, name: str) -> None:
    """CIFAR-style stem for ResNet-family models: stride-1 first convolution, no max-pool.

    A single 7x7 stem conv becomes 3x3 stride 1; a deep stem (timm's ``*d`` / ``*t``
    variants) keeps its convolutions with the first one's stride set to 1.
    """
    stem = getattr(model, "conv1", None)
    if not isinstance(stem, nn.Module) or not isinstance(getattr(model, "maxpool", None), nn.Module):
        raise BackboneError(
            f"model.small_input applies to ResNet-family backbones (conv1 stem + maxpool); {name!r} is not one. "
            "For ViTs set model.backbone_kwargs.img_size / patch_size instead."
        )
    if isinstance(stem, nn.Conv2d):
        model.conv1 = nn.Conv2d(stem.in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
    else:
        first = next(m for m in stem.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    model.maxpool = nn.Identity()


def create_backbone(cfg: ModelConfig, in_chans: int) -> nn.Module:
    """Create ``cfg.backbone`` from timm without a classifier (``num_classes=0``), randomly initialised.

    Args:
        cfg: The model section of the experiment config.
        in_chans: Input channels of the images (1 for grayscale).

    Returns:
        A module mapping ``N x in_chans x H x W`` images to ``N x num_features`` vectors;
        its ``num_features`` attribute gives the feature width.
    """
    if not timm.is_model(cfg.backbone):
        close = difflib.get_close_matches(cfg.backbone, timm.list_models(), n=5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise BackboneError(f"model.backbone: unknown timm model {cfg.backbone!r}{hint}")
    try:
        model = timm.create_model(
            cfg.backbone,
            pretrained=False,
            num_classes=0,
            in_chans=in_chans,
            drop_path_rate=cfg.drop_path_rate,
            **cfg.backbone_kwargs,
        )
    except TypeError as err:
        raise BackboneError(f"model.backbone_kwargs not accepted by {cfg.backbone!r}: {err}") from None
    if cfg.stem_stride == 1:
        _use_small_input_stem(model, cfg.backbone)
    return model


def feature_dim(backbone: nn.Module) -> int:
    """The width of the vectors the backbone returns."""
    width = getattr(backbone, "num_features", None)
    if isinstance(width, int) and width > 0:
        return width
    raise BackboneError(f"{type(backbone).__name__} does not report num_features")


def uses_convolutions(backbone: nn.Module) -> bool:
    """Whether channels_last memory format can help this backbone (it has 2-D convolutions)."""
    return any(isinstance(m, nn.Conv2d) for m in backbone.modules()) and not hasattr(backbone, "patch_embed")

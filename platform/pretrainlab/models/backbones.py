"""Headless timm backbones, with the small-input stem adaptation (``model.stem_stride``) per CNN family."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import timm
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.regnet import RegNet
from timm.models.resnet import ResNet
from torch import nn

from pretrainlab.config import ModelConfig


class BackboneError(ValueError):
    """The configured backbone cannot be built."""


def _adapt_resnet_stem(model: ResNet, stride: int) -> None:
    """ResNet / ResNeXt / SE-ResNet stem: ``conv1`` (stride 2) then ``maxpool`` (stride 2).

    ======  ==================================================================================
    stride  stem
    ======  ==================================================================================
    1       a single 7x7 ``conv1`` becomes 3x3 stride 1, a deep stem's first conv gets stride 1;
            no max-pool
    2       ``conv1`` unchanged (7x7 or deep stem, stride 2); no max-pool
    4       unchanged
    ======  ==================================================================================
    """
    if stride == 1:
        _set_resnet_stem_stride_one(model)
    if stride < 4:
        model.maxpool = nn.Identity()


def _set_resnet_stem_stride_one(model: ResNet) -> None:
    """Replace a single stem conv by a 3x3 stride-1 one, or set a deep stem's first conv to stride 1."""
    stem = model.conv1
    if isinstance(stem, nn.Conv2d):
        model.conv1 = nn.Conv2d(stem.in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
    else:
        first = next(m for m in stem.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)


def _adapt_regnet_stem(model: RegNet, stride: int) -> None:
    """RegNet stem: ``stem.conv``, 3x3 stride 2.

    ======  ==========================
    stride  stem
    ======  ==========================
    1       ``stem.conv`` gets stride 1
    2       unchanged
    ======  ==========================
    """
    model.stem.conv.stride = (stride, stride)


def _adapt_conv_stem(model: EfficientNet | MobileNetV3, stride: int) -> None:
    """MobileNetV2 / MobileNetV3 / EfficientNet stem: ``conv_stem``, 3x3 stride 2.

    ======  ==========================
    stride  stem
    ======  ==========================
    1       ``conv_stem`` gets stride 1
    2       unchanged
    ======  ==========================
    """
    model.conv_stem.stride = (stride, stride)


def _adapt_convnext_stem(model: ConvNeXt, stride: int) -> None:
    """ConvNeXt stem: patchify ``stem[0]``, a conv with kernel = stride = 4.

    ======  ===============================================================
    stride  stem
    ======  ===============================================================
    1, 2    a fresh patchify conv, kernel = stride = ``stride``, same channels
    4       unchanged
    ======  ===============================================================
    """
    if stride != 4:
        patchify = model.stem[0]
        model.stem[0] = nn.Conv2d(patchify.in_channels, patchify.out_channels, stride, stride=stride)


@dataclass(frozen=True)
class _StemFamily:
    """A timm model class whose stem ``adapt`` can set to one of ``strides`` (total stem downsampling)."""

    name: str
    model_class: type[nn.Module]
    strides: tuple[int, ...]
    adapt: Callable[[nn.Module, int], None]

    def describe(self) -> str:
        return f"{self.name} ({', '.join(map(str, self.strides))})"


_STEM_FAMILIES = (
    _StemFamily("ResNet / ResNeXt / SE-ResNet", ResNet, (1, 2, 4), _adapt_resnet_stem),
    _StemFamily("RegNet", RegNet, (1, 2), _adapt_regnet_stem),
    _StemFamily("MobileNetV2 / EfficientNet", EfficientNet, (1, 2), _adapt_conv_stem),
    _StemFamily("MobileNetV3", MobileNetV3, (1, 2), _adapt_conv_stem),
    _StemFamily("ConvNeXt", ConvNeXt, (1, 2, 4), _adapt_convnext_stem),
)


def _set_stem_stride(model: nn.Module, name: str, stride: int) -> None:
    """Set the total downsampling of ``model``'s stem to ``stride``, or raise a ``BackboneError`` naming the options."""
    family = next((f for f in _STEM_FAMILIES if isinstance(model, f.model_class)), None)
    if family is not None and stride in family.strides:
        family.adapt(model, stride)
    elif family is not None:
        raise BackboneError(
            f"model.stem_stride={stride} is not supported for {name!r}: {family.name} stems take "
            f"{', '.join(map(str, family.strides))} or null"
        )
    elif hasattr(model, "patch_embed"):
        raise BackboneError(
            f"model.stem_stride does not apply to {name!r} ({type(model).__name__}, a patch-embedding model); "
            "set model.backbone_kwargs img_size / patch_size instead and leave model.stem_stride null"
        )
    else:
        supported = "; ".join(f.describe() for f in _STEM_FAMILIES)
        raise BackboneError(
            f"model.stem_stride is not supported for {name!r} ({type(model).__name__}); "
            f"it applies to these families (strides): {supported}"
        )


def create_backbone(cfg: ModelConfig, in_chans: int) -> nn.Module:
    """Create ``cfg.backbone`` from timm without a classifier (``num_classes=0``), randomly initialised.

    ``cfg.stem_stride`` (when set) changes the stem's total downsampling, see ``_STEM_FAMILIES``.

    Args:
        cfg: The model section of the experiment config.
        in_chans: Input channels of the images (1 for grayscale).

    Returns:
        A module mapping ``N x in_chans x H x W`` images to ``N x feature_dim(model)`` vectors.
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
    if cfg.stem_stride is not None:
        _set_stem_stride(model, cfg.backbone, cfg.stem_stride)
    return model


def feature_dim(backbone: nn.Module) -> int:
    """The width of the vectors the backbone returns.

    timm's ``head_hidden_size`` when the model has one: it differs from ``num_features`` where a
    conv head follows the pooling (MobileNetV3: 288 channels pooled, then 1024 features).
    """
    for attribute in ("head_hidden_size", "num_features"):
        width = getattr(backbone, attribute, None)
        if isinstance(width, int) and width > 0:
            return width
    raise BackboneError(f"{type(backbone).__name__} reports neither head_hidden_size nor num_features")


def uses_convolutions(backbone: nn.Module) -> bool:
    """Whether channels_last memory format can help this backbone (it has 2-D convolutions)."""
    return any(isinstance(m, nn.Conv2d) for m in backbone.modules()) and not hasattr(backbone, "patch_embed")

"""Backbone families built by name, and the per-family small-input stem (``model.stem_stride``)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from pretrainlab.config import ModelConfig
from pretrainlab.models.backbones import BackboneError, create_backbone, feature_dim

torch.set_num_threads(2)

SMALL_VIT = {"img_size": 32, "patch_size": 4}

FAMILIES = [
    # (backbone, backbone_kwargs, in_chans, feature width)
    ("resnet18", {}, 3, 512),
    ("resnext26ts", {}, 3, 2048),
    ("seresnet18", {}, 1, 512),
    ("regnetx_002", {}, 3, 368),
    ("mobilenetv2_050", {}, 1, 1280),
    ("mobilenetv3_small_050", {}, 3, 1024),
    ("efficientnet_b0", {}, 3, 1280),
    ("convnext_atto", {}, 1, 320),
    ("vit_tiny_patch16_224", SMALL_VIT, 3, 192),
    ("deit_tiny_patch16_224", SMALL_VIT, 1, 192),
    ("swin_tiny_patch4_window7_224", {**SMALL_VIT, "window_size": 4}, 3, 768),
    ("test_resnet", {}, 1, 96),
    ("test_vit", SMALL_VIT, 3, 64),
    ("test_convnext", {}, 3, 64),
    ("test_efficientnet", {}, 1, 256),
]


def _images(in_chans: int) -> torch.Tensor:
    return torch.randn(2, in_chans, 32, 32, generator=torch.Generator().manual_seed(0))


def _feature_map_side(backbone: str, stem_stride: int | None) -> int:
    model = create_backbone(ModelConfig(backbone=backbone, stem_stride=stem_stride), in_chans=3).eval()
    with torch.no_grad():
        features = model.forward_features(_images(3))
    assert features.shape[-1] == features.shape[-2]
    return features.shape[-1]


def test_timm_test_models_are_installed():
    assert {"test_resnet", "test_vit", "test_convnext", "test_efficientnet"} <= set(timm.list_models("test_*"))


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "kwargs", "in_chans", "width"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_forward_backward_gives_feature_width(backbone, kwargs, in_chans, width):
    torch.manual_seed(0)
    model = create_backbone(ModelConfig(backbone=backbone, backbone_kwargs=kwargs), in_chans=in_chans)
    features = model(_images(in_chans))
    assert feature_dim(model) == width
    assert features.shape == (2, width)
    features.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


STEM_SIDES = [
    # (backbone, {stem_stride: feature-map side on 32x32 input}); None is the model's own stem
    ("resnet18", {None: 1, 4: 1, 2: 2, 1: 4}),
    ("seresnet18", {2: 2, 1: 4}),
    ("test_resnet", {None: 1, 2: 2, 1: 4}),
    ("regnetx_002", {None: 1, 2: 1, 1: 2}),
    ("mobilenetv2_050", {None: 1, 2: 1, 1: 2}),
    ("mobilenetv3_small_050", {None: 1, 2: 1, 1: 2}),
    ("efficientnet_b0", {None: 1, 2: 1, 1: 2}),
    ("convnext_atto", {None: 1, 4: 1, 2: 2, 1: 4}),
    ("test_convnext", {4: 1, 1: 4}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "sides"), STEM_SIDES, ids=[s[0] for s in STEM_SIDES])
def test_stem_stride_sets_feature_map_side(backbone, sides):
    assert {stride: _feature_map_side(backbone, stride) for stride in sides} == sides


def test_resnet_stems_per_stride():
    stride_one = create_backbone(ModelConfig(backbone="resnet18", stem_stride=1), in_chans=1)
    assert (stride_one.conv1.kernel_size, stride_one.conv1.stride, stride_one.conv1.in_channels) == ((3, 3), (1, 1), 1)
    assert isinstance(stride_one.maxpool, nn.Identity)

    stride_two = create_backbone(ModelConfig(backbone="resnet18", stem_stride=2), in_chans=3)
    assert (stride_two.conv1.kernel_size, stride_two.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(stride_two.maxpool, nn.Identity)

    deep = create_backbone(ModelConfig(backbone="resnet18d", stem_stride=1), in_chans=3)
    convs = [m for m in deep.conv1.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(1, 1), (1, 1), (1, 1)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3), (3, 3)]


def test_convnext_stem_is_a_fresh_patchify_conv():
    model = create_backbone(ModelConfig(backbone="convnext_atto", stem_stride=2), in_chans=1)
    patchify = model.stem[0]
    assert (patchify.in_channels, patchify.out_channels) == (1, 40)
    assert (patchify.kernel_size, patchify.stride) == ((2, 2), (2, 2))


REFUSED = [
    # (backbone, backbone_kwargs, stem_stride, expected message pattern)
    ("resnet18", {}, 3, r"model\.stem_stride=3 .*'resnet18': ResNet / ResNeXt / SE-ResNet stems take 1, 2, 4"),
    ("regnetx_002", {}, 4, r"model\.stem_stride=4 .*'regnetx_002': RegNet stems take 1, 2 or null"),
    ("mobilenetv3_small_050", {}, 4, r"model\.stem_stride=4 .*MobileNetV3 stems take 1, 2 or null"),
    ("efficientnet_b0", {}, 8, r"model\.stem_stride=8 .*MobileNetV2 / EfficientNet stems take 1, 2 or null"),
    ("convnext_atto", {}, 8, r"model\.stem_stride=8 .*'convnext_atto': ConvNeXt stems take 1, 2, 4 or null"),
    ("test_vit", SMALL_VIT, 1, r"model\.stem_stride .*'test_vit'.*model\.backbone_kwargs img_size / patch_size"),
    ("swin_tiny_patch4_window7_224", {}, 2, r"model\.stem_stride .*'swin_tiny.*backbone_kwargs img_size"),
    ("resnext26ts", {}, 1, r"model\.stem_stride .*'resnext26ts' \(ByobNet\).*SE-ResNet \(1, 2, 4\); RegNet \(1, 2\)"),
]


@pytest.mark.parametrize(
    ("backbone", "kwargs", "stem_stride", "message"), REFUSED, ids=[f"{r[0]}-{r[2]}" for r in REFUSED]
)
def test_unsupported_stem_stride_is_refused(backbone, kwargs, stem_stride, message):
    with pytest.raises(BackboneError, match=message):
        create_backbone(ModelConfig(backbone=backbone, backbone_kwargs=kwargs, stem_stride=stem_stride), in_chans=3)

"""torchvision and timm weight files imported into PretrainLab's headless timm backbones."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from pretrainlab.config import ModelConfig
from pretrainlab.models.backbones import create_backbone
from pretrainlab.models.interop import InteropError, load_pretrained_backbone


@pytest.fixture(scope="module")
def torchvision_resnet18(tmp_path_factory):
    """A randomly initialised torchvision ResNet-18 (eval mode) and its state dict saved with torch.save."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that loading them is checked too
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_torchvision_resnet18_into_pretrainlab_backbone(torchvision_resnet18):
    tv_model, path = torchvision_resnet18
    backbone = create_backbone(ModelConfig(backbone="resnet18"), in_chans=3).eval()
    report = load_pretrained_backbone(backbone, path, source="torchvision")
    assert report.complete and report.family == "torchvision resnet"
    assert report.dropped_head == ["fc.bias", "fc.weight"]
    tv_state = tv_model.state_dict()
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, tv_state[key]), key
    assert len(report.loaded) == len(tv_state) - 2
    tv_model.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), tv_model(x), atol=1e-5, rtol=0)


def test_timm_state_dict_round_trip_with_head_and_grayscale(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("resnet18", num_classes=7, pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file(full.state_dict(), str(path))

    backbone = create_backbone(ModelConfig(backbone="resnet18"), in_chans=3).eval()
    report = load_pretrained_backbone(backbone, path, source="timm")
    assert report.complete and report.dropped_head == ["fc.bias", "fc.weight"]
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, full.state_dict()[key]), key
    full.reset_classifier(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), full.eval()(x), atol=1e-6, rtol=0)

    gray = create_backbone(ModelConfig(backbone="resnet18"), in_chans=1)
    report = load_pretrained_backbone(gray, path, source="timm")
    assert report.complete and report.adapted == ["conv1.weight: 3 -> 1 input channels"]
    torch.testing.assert_close(gray.conv1.weight, full.conv1.weight.sum(dim=1, keepdim=True))


def test_wrapped_torch_save_with_ddp_prefix(tmp_path):
    full = timm.create_model("test_resnet", num_classes=3)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, path)
    backbone = timm.create_model("test_resnet", num_classes=0)
    assert load_pretrained_backbone(backbone, path).complete


def test_wrong_architecture_lists_the_keys(torchvision_resnet18, capsys):
    _, path = torchvision_resnet18
    backbone = create_backbone(ModelConfig(backbone="resnet34"), in_chans=3)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(InteropError) as err:
        load_pretrained_backbone(backbone, path, source="torchvision")
    message = str(err.value)
    assert "does not fit ResNet exactly" in message
    assert "missing: layer1.2.bn1.bias" in message and "layer4.2.conv2.weight" in message
    assert err.value.report.missing[-1] in message and len(err.value.report.missing) == 8 * 12, "8 more BasicBlocks"
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items()), "strict loads nothing"

    report = load_pretrained_backbone(backbone, path, source="torchvision", strict=False)
    assert not report.complete and not report.unexpected and not report.mismatched
    assert "layer3.5.conv1.weight" in report.missing and "layer1.0.conv1.weight" in report.loaded
    torch.testing.assert_close(backbone.layer1[0].conv1.weight, torchvision_resnet18[0].layer1[0].conv1.weight)


def test_shape_mismatch_and_other_family(torchvision_resnet18):
    _, path = torchvision_resnet18
    small = create_backbone(ModelConfig(backbone="resnet18", stem_stride=1), in_chans=3)
    report = load_pretrained_backbone(small, path, source="torchvision", strict=False)
    assert report.mismatched == [("conv1.weight", (64, 3, 7, 7), (64, 3, 3, 3))]
    assert len(report.loaded) == len(small.state_dict()) - 1 and "conv1.weight" not in report.loaded

    vit = timm.create_model("test_vit", num_classes=0, img_size=32, patch_size=4)
    with pytest.raises(InteropError, match=r"(?s)missing: blocks\.0\.attn\.proj\.bias.*unexpected: bn1\.bias"):
        load_pretrained_backbone(vit, path, source="torchvision")


def test_torchvision_vit_and_convnext_names(tmp_path):
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    tv_vit = VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128)
    torch.save(tv_vit.state_dict(), tmp_path / "vit.pth")
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2, num_classes=0
    )
    assert load_pretrained_backbone(vit, tmp_path / "vit.pth", source="torchvision").complete
    tv_vit.heads = nn.Identity()
    small = timm.models.vision_transformer.VisionTransformer(
        img_size=24, patch_size=2, in_chans=1, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2, num_classes=0
    )
    report = load_pretrained_backbone(small, tmp_path / "vit.pth", source="torchvision")
    assert report.complete and report.adapted == ["patch_embed.proj.weight: 3 -> 1 input channels"]
    assert report.mismatched == [] and small.pos_embed.shape == (1, 1 + 12 * 12, 64), "8 x 8 grid resampled"

    stages = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, 24, 1), CNBlockConfig(24, 32, 1), CNBlockConfig(32, None, 1)]
    tv_convnext = ConvNeXt(stages)
    torch.save(tv_convnext.state_dict(), tmp_path / "convnext.pth")
    convnext = timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=0)
    assert load_pretrained_backbone(convnext, tmp_path / "convnext.pth", source="torchvision").complete
    tv_convnext.classifier[2] = nn.Identity()

    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(vit.eval()(x), tv_vit.eval()(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(convnext.eval()(x), tv_convnext.eval()(x), atol=1e-5, rtol=0)


def test_unreadable_files(tmp_path):
    backbone = timm.create_model("test_resnet", num_classes=0)
    with pytest.raises(InteropError, match="no such weights file"):
        load_pretrained_backbone(backbone, tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InteropError, match="junk.pth: not a plain state dict of tensors"):
        load_pretrained_backbone(backbone, tmp_path / "junk.pth")
    torch.save(backbone, tmp_path / "pickled-module.pt")
    with pytest.raises(InteropError, match="pickled-module.pt: not a plain state dict of tensors"):
        load_pretrained_backbone(backbone, tmp_path / "pickled-module.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(InteropError, match="holds no state dict"):
        load_pretrained_backbone(backbone, tmp_path / "meta.pt")
    with pytest.raises(InteropError, match="source must be one of timm, torchvision"):
        load_pretrained_backbone(backbone, tmp_path / "meta.pt", source="caffe")

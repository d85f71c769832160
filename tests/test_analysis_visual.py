"""t-SNE, class activation maps, confusion matrix and ONNX export of small checkpoints trained on digits.

A tiny CNN (timm ``test_resnet``) and a tiny ViT (timm ``test_vit``, 16 px, 4 px patches)
are trained a few SGD steps in this process and saved as real checkpoints, with the meta
keys the training loop writes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from conftest import CONFIGS, train_digits_checkpoint
from pretrainlab.analysis import cam, confusion_matrix, export, samples, tsne
from pretrainlab.config import load_config
from pretrainlab.data.builtin import prepare_builtin
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.dataset import load_split_numpy
from pretrainlab.evaluation.figures import stratified_indices
from pretrainlab.inference.loading import load_model

DIGITS = CONFIGS / "test-resnet_2xb32_digits.yaml"
CNN = ["data.eval_pipeline=[{type: Resize, size: 16}]"]
VIT = [
    "model.backbone=test_vit",
    "model.stem_stride=null",
    "model.backbone_kwargs={img_size: 16, patch_size: 4}",
    "data.eval_pipeline=[{type: Resize, size: 16}]",
]


def train_checkpoint(folder: Path, data_root: Path, overrides: list[str], steps: int = 30) -> Path:
    """A checkpoint of ``steps`` SGD steps on the digits training split, data under ``data_root``."""
    cfg = load_config(DIGITS, [f"data.root={data_root}", "optim.lr=0.1", *overrides])
    data = prepare_builtin("digits", data_root, seed=cfg.runtime.seed)
    return train_digits_checkpoint(cfg, data, folder, steps)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``{"cnn": folder, "vit": folder}``; the digits shards live in this module's own folder."""
    root = tmp_path_factory.mktemp("visual")
    data_root = root / "data"
    return {
        "cnn": train_checkpoint(root / "cnn", data_root, CNN),
        "vit": train_checkpoint(root / "vit", data_root, VIT, steps=20),
    }


def assert_png(path: Path, min_size: int = 100) -> tuple[int, int]:
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_size
        return image.size


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def test_confusion_matrix_png_and_csv(project, checkpoints, tmp_path, capsys):
    out = tmp_path / "cm" / "digits.png"
    assert confusion_matrix.main([str(checkpoints["cnn"]), "--out", str(out)]) == 0
    assert_png(out, 300)
    rows = read_csv(out.with_suffix(".csv"))
    assert rows[0] == ["true\\pred", *[str(d) for d in range(10)]]
    counts = np.array([[int(v) for v in row[1:]] for row in rows[1:]])
    assert counts.sum() == len(load_split_numpy(dataset_dir(load_model(checkpoints["cnn"]).config), "test")[1])
    top1 = float(capsys.readouterr().out.split("top1 ")[1].split()[0])
    assert top1 == pytest.approx(100 * np.trace(counts) / counts.sum(), abs=1e-3)
    assert top1 > 30, "a few SGD steps already beat chance (10%)"


def test_confusion_matrix_normalized_rows(project, checkpoints, tmp_path):
    out = tmp_path / "norm.png"
    assert confusion_matrix.main([str(checkpoints["vit"]), "--split", "val", "--normalize", "--out", str(out)]) == 0
    assert_png(out, 300)
    rows = np.array([[float(v) for v in row[1:]] for row in read_csv(out.with_suffix(".csv"))[1:]])
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=0.01)


def test_tsne_png_and_points_logged_to_mlflow(project, checkpoints, tmp_path):
    client = MlflowClient()
    run = client.create_run(client.create_experiment("analysis"))
    out = tmp_path / "tsne.png"
    argv = [str(checkpoints["cnn"]), "--num", "120", "--perplexity", "10", "--out", str(out)]
    assert tsne.main([*argv, "--mlflow-run", run.info.run_id]) == 0
    assert_png(out, 300)
    rows = read_csv(out.with_suffix(".csv"))
    assert rows[0] == ["row", "label", "class", "x", "y"] and len(rows) == 121
    per_class = np.bincount([int(r[1]) for r in rows[1:]], minlength=10)
    assert per_class.min() >= 10 and per_class.max() <= 14, f"not stratified: {per_class}"
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "tsne"))
    assert logged == ["tsne/tsne.csv", "tsne/tsne.png"]


def test_stratified_indices_keep_class_shares():
    labels = np.repeat(np.arange(3), [60, 30, 10])
    chosen = stratified_indices(labels, 20, seed=1)
    assert len(set(chosen.tolist())) == 20
    assert np.bincount(labels[chosen]).tolist() == [12, 6, 2]
    assert len(stratified_indices(labels, 500)) == 100


@pytest.mark.parametrize(
    ("kind", "method", "layer", "expected_layer"),
    [
        ("cnn", "gradcam", None, "layer4"),
        ("cnn", "gradcam++", "layer3", "layer3"),
        ("vit", "gradcam", None, "blocks.5.norm1"),
        ("vit", "eigencam", "backbone.blocks.4.norm1", "blocks.4.norm1"),
    ],
)
def test_cam_grid(project, checkpoints, tmp_path, capsys, kind, method, layer, expected_layer):
    out = tmp_path / f"{kind}-{method}.png"
    argv = [str(checkpoints[kind]), "--num", "6", "--method", method, "--out", str(out)]
    assert cam.main(argv + (["--target-layer", layer] if layer else [])) == 0
    width, height = assert_png(out, 200)
    assert width > height, "6 images: 4 columns x 2 rows"
    printed = capsys.readouterr().out
    assert f"{method}: target layer {expected_layer} of " in printed and f"wrote {out}" in printed


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_cam_maps_are_spatial(checkpoints, kind):
    """The maps vary over the image (the ViT's tokens land on the 4 x 4 patch grid, class token skipped)."""
    loaded = load_model(checkpoints[kind])
    images, _ = load_split_numpy(dataset_dir(loaded.config), "test")
    _, inputs = samples.eval_images(images[:8], loaded.config.data)
    maps, preds, layer = cam.compute_cams(loaded.model, inputs, "gradcam", None)
    assert maps.shape == (8, 16, 16) and preds.shape == (8,)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert (maps.reshape(8, -1).std(axis=1) > 0).sum() >= 4
    if kind == "vit":
        backbone = loaded.model.backbone
        grid = cam.reshape_for(backbone, backbone.blocks[-1].norm1, inputs[:2])(torch.randn(2, 17, 64))
        assert grid.shape == (2, 64, 4, 4)


def test_cam_logged_to_mlflow_run(project, checkpoints, tmp_path):
    client = MlflowClient()
    run = client.create_run(client.create_experiment("cam"))
    out = tmp_path / "c.png"
    assert cam.main([str(checkpoints["vit"]), "--num", "2", "--out", str(out), "--mlflow-run", run.info.run_id]) == 0
    assert [a.path for a in client.list_artifacts(run.info.run_id, "cam")] == ["cam/c.png"]


@pytest.mark.parametrize(
    ("tool", "extra", "message"),
    [
        (cam, ["--target-layer", "layer9"], "--target-layer 'layer9': no such module in ResNet; close matches: layer"),
        (cam, ["--method", "scorecam"], "--method must be one of gradcam, gradcam++, eigencam"),
        (tsne, ["--perplexity", "50", "--num", "20"], "--perplexity must be between 0 and the number of samples (20)"),
        (tsne, ["--split", "holdout"], "holdout"),
        (confusion_matrix, ["--split", "holdout"], "holdout"),
        (confusion_matrix, ["--mlflow-run", "0123456789abcdef"], "--mlflow-run 0123456789abcdef: not a run of"),
        (export, ["--mlflow-run", "0123456789abcdef"], "--mlflow-run 0123456789abcdef: not a run of"),
    ],
)
def test_bad_inputs_exit_2_with_a_named_error(project, checkpoints, tmp_path, capsys, tool, extra, message):
    assert tool.main([str(checkpoints["cnn"]), "--out", str(tmp_path / "x.png"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("tool", [cam, tsne, confusion_matrix, export])
def test_missing_checkpoint(project, tmp_path, capsys, tool):
    assert tool.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")]) == 2
    assert "nowhere: no such checkpoint folder" in capsys.readouterr().err


def test_unknown_registered_model(project, tmp_path, capsys):
    assert cam.main(["models:/no-such-model@champion", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("error: models:/no-such-model@champion: cannot be fetched") and "Traceback" not in err


def test_onnx_classifier_matches_pytorch(checkpoints, tmp_path):
    path = tmp_path / "cnn.onnx"
    report = export.export_onnx(checkpoints["cnn"], path)
    assert report.input_size == (1, 16, 16) and report.output_name == "logits"
    assert report.output_shape[1] == 10 and isinstance(report.output_shape[0], str), "dynamic batch"
    assert set(report.diffs) == {2, 3} and report.max_abs_diff < 1e-4
    import onnxruntime as ort

    loaded = load_model(checkpoints["cnn"])
    images, _ = load_split_numpy(dataset_dir(loaded.config), "test")
    _, inputs = samples.eval_images(images[:5], loaded.config.data)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"image": inputs.numpy()})[0]
    with torch.no_grad():
        torch_logits = loaded.model({"image": inputs})["logits"].numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)


@pytest.mark.slow
def test_onnx_vit_features_cli(checkpoints, tmp_path, capsys):
    out = tmp_path / "vit-features.onnx"
    assert export.main([str(checkpoints["vit"]), "--out", str(out), "--features"]) == 0
    printed = capsys.readouterr().out
    assert "image [N, 1, 16, 16] -> features ['batch', 64]" in printed
    diff = float(printed.split("max abs diff ")[1].split()[0])
    assert diff < 1e-4 and out.stat().st_size > 0
    assert f"wrote {out}" in printed


def test_onnx_static_batch_and_bad_input_size(checkpoints, tmp_path, capsys):
    report = export.export_onnx(checkpoints["cnn"], tmp_path / "s.onnx", dynamic_batch=False, input_size=(1, 24, 24))
    assert report.output_shape == [2, 10] and set(report.diffs) == {2}
    argv = [str(checkpoints["cnn"]), "--out", str(tmp_path / "v.onnx"), "--input-size", "3", "16", "16"]
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the model does not run on 3 x 16 x 16 images") and "Traceback" not in err

"""The dataset browser writes a real PNG of augmented samples, and logs it to MLflow when asked."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from PIL import Image

from conftest import CONFIGS
from pretrainlab.analysis import browse

FMNIST = str(CONFIGS / "resnet10t_1xb128_fmnist.yaml")


def test_grid_of_augmented_views_with_masks(project, tmp_path):
    out = tmp_path / "grid.png"
    views = "data.views=[{pipeline: [{type: RandomResizedCrop, size: 28}], count: 2}]"
    mask = "data.mask={kind: block, ratio: 0.5, patch_size: 4}"
    assert browse.main([FMNIST, "--num", "4", "--out", str(out), "--set", views, "--set", mask]) == 0
    with Image.open(out) as image:
        image.verify()
        assert image.width > 100 and image.height > 300


def test_logged_to_an_mlflow_run(project, tmp_path):
    client = MlflowClient()
    run = client.create_run(client.create_experiment("browse"))
    out = tmp_path / "b.png"
    assert browse.main([FMNIST, "--num", "3", "--out", str(out), "--mlflow-run", run.info.run_id]) == 0
    assert [a.path for a in client.list_artifacts(run.info.run_id, "browse")] == ["browse/b.png"]


def test_bad_pipeline_is_reported(project, tmp_path, capsys):
    bad = "data.train_pipeline=[{type: Blur}]"
    assert browse.main([FMNIST, "--out", str(tmp_path / "x.png"), "--set", bad]) == 2
    assert "unknown op 'Blur'" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["caption", "vqa", "grounding", "retrieval"])
def test_image_text_sets_from_prepare_data_scenes(scenes, tmp_path, task):
    out = tmp_path / f"{task}.png"
    assert browse.main([FMNIST, "--set", f"data.dataset={scenes / task}", "--num", "5", "--out", str(out)]) == 0
    with Image.open(out) as image:
        image.verify()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    import prepare_data

    out = tmp_path_factory.mktemp("scenes")
    assert prepare_data.main(["scenes", "-", str(out), "--num-images", "40", "--image-size", "64", "--seed", "3"]) == 0
    return out

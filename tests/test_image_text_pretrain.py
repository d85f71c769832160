"""Image-text models end to end: 2 steps on 2 Ray Train workers with tiny towers on a tiny scenes set, validated,
checkpointed, evaluated on the test splits, logged to MLflow, and loaded by the inference API."""

from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient

import pretrainlab
from conftest import CONFIGS
from pretrainlab.data.scenes import write_scenes
from pretrainlab.tracking.mlflow import RUN_NAME_TAG

pytestmark = pytest.mark.needs_ray

TINY_TOWERS = {
    "clip": {"embed_dim": 16, "text_width": 16, "text_layers": 1, "text_heads": 2},
    "blip": {"embed_dim": 16, "width": 16, "text_layers": 1, "decoder_layers": 1, "heads": 2},
}
CASES = {  # name -> strategy, scenes dataset, validation metric, a test metric the job logs
    "clip-retrieval": ("clip", "retrieval", "val/t2i_r1", "test_compositional/t2i_r1"),
    "blip-caption": ("blip", "caption", "val/lm_loss", "test/cider"),
    "blip-vqa": ("blip", "vqa", "val/lm_loss", "test/vqa_soft"),
    "blip-grounding": ("blip", "grounding", "val/acc_iou50", "test/acc_iou50"),  # the box head, as its config
}
LOWER_IS_BETTER = ("val/lm_loss",)


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    return local_ray


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """256 images at 64 px: 204 train (2 workers x 2 steps of 48), 13 val, 26 test, 13 compositional."""
    return write_scenes(tmp_path_factory.mktemp("scenes"), num_images=256, image_size=64, seed=4, workers=1)


def case_config(tmp_path, scenes, name: str) -> str:
    strategy, task, metric, _ = CASES[name]
    config = {
        "_base_": [str(CONFIGS / "_base_" / "runtime" / "default.yaml")],
        "name": f"test-{name}_scenes",
        "strategy": strategy,
        "strategy_params": {**TINY_TOWERS[strategy], **({"box_head": True} if task == "grounding" else {})},
        "model": {"backbone": "test_resnet"},
        "data": {"dataset": str(scenes[task]), "mean": [0.65] * 3, "std": [0.15] * 3, "context_length": 40},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
        "train": {
            "epochs": 1,
            "batch_size": 48,
            "num_workers": 2,
            "cpus_per_worker": 1,
            "eval_batch_size": 64,
            "log_every_n_steps": 1,
            "checkpoint": {"score_metric": metric, "score_mode": "min" if metric in LOWER_IS_BETTER else "max"},
        },
        "runtime": {"experiment": "scenes-e2e"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("name", list(CASES))
def test_image_text_model_trains_on_two_workers_and_serves_its_task(project, tmp_path, scenes, name, capsys):
    import pretrain

    strategy, task, metric, test_metric = CASES[name]
    assert pretrain.main([case_config(tmp_path, scenes, name), "--run-name", f"{name}-e2e"]) == 0
    client = MlflowClient()
    experiment = client.get_experiment_by_name("scenes-e2e")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}-e2e'")
    metrics = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == strategy
    assert metrics["step"] == 2  # 204 training images / 2 workers // 48
    assert metric in metrics and test_metric in metrics and "train/loss" in metrics
    if task == "grounding":  # validation of the box head: its loss and scores, every worker's objects together
        assert {"val/box_loss", "val/miou", "train/cell_loss", "train/giou_loss"} <= set(metrics)
        assert 0 <= metrics["val/acc_iou50"] <= 100

    model = pretrainlab.get_model(f"runs:/{run.info.run_id}/checkpoint")
    assert model.info.task == ("image_text" if strategy == "clip" else task)
    image = _first_test_image(scenes[task])
    if name == "clip-retrieval":
        (result,) = pretrainlab.inference_model(model, [image], texts=["a red circle", "a blue bag"])
        assert result["pred_text"] in ("a red circle", "a blue bag")
    elif task == "caption":
        (result,) = pretrainlab.inference_model(model, [image], max_new_tokens=5)
        assert isinstance(result["pred_caption"], str)
    elif task == "vqa":
        (result,) = pretrainlab.inference_model(model, [image], questions="how many objects are there?")
        assert isinstance(result["pred_answer"], str)
    else:
        (result,) = pretrainlab.inference_model(model, [image], texts="the red object")
        assert len(result["pred_bbox"]) == 4
    assert "error: " not in capsys.readouterr().err  # the jobs print "error: ..." when they fail


def _first_test_image(folder):
    from pretrainlab.data.dataset import load_split_annotated

    images, _ = load_split_annotated(folder, "test")
    return images[0].transpose(1, 2, 0)

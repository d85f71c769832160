"""Every self-supervised method end to end: 2 steps on 2 Ray Train workers with a tiny backbone on digits,
validated by kNN, checkpointed, logged to MLflow, and its checkpoint read by the linear probe and kNN jobs."""

from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient

from conftest import CONFIGS
from pretrainlab.checkpoint import load_checkpoint
from pretrainlab.tracking.mlflow import RUN_NAME_TAG

pytestmark = pytest.mark.needs_ray

TWO_VIEWS = [{"count": 2, "pipeline": [{"type": "RandomResizedCrop", "size": 8, "scale": [0.5, 1.0]}]}]
TINY_CNN = {"backbone": "test_resnet", "stem_stride": 1}
TINY_VIT = {"backbone": "test_vit", "backbone_kwargs": {"img_size": 8, "patch_size": 2}}

METHODS = {
    "simclr": {"model": TINY_CNN, "data": {"views": TWO_VIEWS}},
    "mocov3": {
        "model": TINY_CNN,
        "data": {"views": TWO_VIEWS},
        "strategy_params": {"proj_hidden_dim": 64, "pred_hidden_dim": 64, "proj_dim": 32},
    },
    "byol": {"model": TINY_CNN, "data": {"views": TWO_VIEWS}, "strategy_params": {"proj_hidden_dim": 64}},
    "simsiam": {"model": TINY_CNN, "data": {"views": TWO_VIEWS}},
    "barlowtwins": {
        "model": TINY_CNN,
        "data": {"views": TWO_VIEWS},
        "strategy_params": {"proj_hidden_dim": 64, "proj_dim": 64},
    },
    "dino": {
        "model": {**TINY_VIT, "backbone_kwargs": {**TINY_VIT["backbone_kwargs"], "dynamic_img_size": True}},
        "data": {
            "views": [
                *TWO_VIEWS,
                {"count": 2, "pipeline": [{"type": "RandomResizedCrop", "size": 4, "scale": [0.2, 0.5]}]},
            ]
        },
        "strategy_params": {"out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32},
    },
    "mae": {"model": TINY_VIT, "data": {"mask": {"kind": "random", "ratio": 0.75, "patch_size": 2}}},
    "simmim": {"model": TINY_VIT, "data": {"mask": {"kind": "block", "ratio": 0.5, "patch_size": 2}}},
}


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    return local_ray


def method_config(tmp_path, method: str) -> str:
    """A digits config for ``method``: 2 workers x 300 images, one epoch of 2 steps."""
    spec = METHODS[method]
    data = {"dataset": "digits", "mean": [0.307], "std": [0.378], **spec["data"]}
    if "mask" in spec["data"]:
        data["train_pipeline"] = [{"type": "RandomResizedCrop", "size": 8, "scale": [0.5, 1.0]}]
    config = {
        "_base_": [str(CONFIGS / "_base_" / "runtime" / "default.yaml")],
        "name": f"test-{method}_digits",
        "strategy": method,
        "strategy_params": spec.get("strategy_params", {}),
        "model": spec["model"],
        "data": data,
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
        "train": {
            "epochs": 1,
            "batch_size": 300,
            "num_workers": 2,
            "cpus_per_worker": 1,
            "eval_batch_size": 256,
            "log_every_n_steps": 1,
            "checkpoint": {"score_metric": "val/knn_top1"},
        },
        "runtime": {"experiment": "digits-ssl"},
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_pretrains_on_two_workers_and_its_checkpoint_is_probed(project, tmp_path, method, capsys):
    import knn_eval
    import linear_probe
    import pretrain

    assert pretrain.main([method_config(tmp_path, method), "--run-name", f"{method}-e2e"]) == 0
    client = MlflowClient()
    experiment = client.get_experiment_by_name("digits-ssl")
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{method}-e2e'")
    assert run.info.status == "FINISHED" and run.data.tags["strategy"] == method
    metrics = run.data.metrics
    assert metrics["step"] == 2  # 1,257 training images / 2 workers // 300
    assert 0 <= metrics["val/knn_top1"] <= 100 and metrics["test/knn_top1_k20"] > 10.0  # chance is 10%
    assert "train/loss" in metrics
    assert {"checkpoint", "evaluation"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoint")
    checkpoint = load_checkpoint(local)
    assert checkpoint.meta["strategy"] == method and checkpoint.meta["step"] == 2
    assert any(key.startswith("backbone.") for key in checkpoint.weights)
    uri = f"runs:/{run.info.run_id}/checkpoint"
    assert linear_probe.main([uri, "--epochs", "5"]) == 0
    assert knn_eval.main([uri, "--k", "5"]) == 0
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
    )
    found = {key for child in children for key in child.data.metrics}
    assert {"linear_probe/top1", "knn/top1_k5"} <= found
    assert "error" not in capsys.readouterr().err

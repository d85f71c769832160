"""Shared storage on S3: a real S3-compatible server (moto's server mode) on 127.0.0.1 holds the dataset's shards,
Ray Train's checkpoints and the artifacts of a real ``mlflow server``; a run resumes from its checkpoint in the
bucket. The AWS variables a user sets (credentials, region, ``AWS_ENDPOINT_URL``) point every process at it."""

from __future__ import annotations

import boto3
import numpy as np
import pyarrow.fs
import pytest
from mlflow import MlflowClient

import pretrainlab
from conftest import BUCKET, CONFIGS, MlflowServer, free_port
from pretrainlab.config import load_config
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.dataset import load_split_numpy
from pretrainlab.tracking.mlflow import RUN_NAME_TAG

pytestmark = pytest.mark.needs_server

CONFIG = str(CONFIGS / "test-resnet_2xb32_digits.yaml")


@pytest.fixture(scope="module")
def mlflow_server(s3, tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1: runs in sqlite, artifacts in ``s3://BUCKET/mlflow``."""
    folder = tmp_path_factory.mktemp("mlflow")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    with MlflowServer(folder, store, artifacts=f"s3://{BUCKET}/mlflow") as server:  # with the AWS variables of s3
        yield server.uri


@pytest.fixture(scope="module")
def ray_on_s3(s3, request):
    """The module's local Ray, started after ``s3`` so that its workers inherit the AWS variables."""
    return request.getfixturevalue("local_ray")


def pretrain(*args: str) -> int:
    import pretrain as job  # jobs/ is on sys.path through conftest

    return job.main([CONFIG, *args])


def keys(prefix: str) -> list[str]:
    """The object keys under ``prefix`` in ``BUCKET``, relative to it, sorted."""
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"].removeprefix(prefix) for page in pages for item in page.get("Contents", []))


@pytest.mark.needs_ray
def test_shards_checkpoints_and_artifacts_on_s3_and_resume(project, s3, mlflow_server, ray_on_s3, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    data = f"s3://{BUCKET}/data/digits"
    pyarrow.fs.copy_files(dataset_dir(load_config(CONFIG)), data, source_filesystem=pyarrow.fs.LocalFileSystem())
    args = [
        "--run-name",
        "digits-s3",
        "--set",
        f"train.storage_path=s3://{BUCKET}/runs",
        "--set",
        f"data.dataset={data}",
    ]
    assert pretrain(*args) == 0
    assert f"(Ray Train copy: s3://{BUCKET}/runs/digits-s3/checkpoint_" in capsys.readouterr().out

    checkpoints: dict[str, set[str]] = {}
    for key in keys("runs/digits-s3/"):
        folder, _, file = key.partition("/")
        if folder.startswith("checkpoint_") and file:  # not the folder's own marker object
            checkpoints.setdefault(folder, set()).add(file)
    assert len(checkpoints) == 2, checkpoints  # one per epoch, train.checkpoint.num_to_keep: 2
    for files in checkpoints.values():
        assert {"model.safetensors", "config.json", "training_state.pt"} <= files

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags[RUN_NAME_TAG] == "digits-s3"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
    artifacts = keys(f"mlflow/{run.info.experiment_id}/{run_id}/artifacts/")
    for name in ("checkpoint/model.safetensors", "checkpoint/config.json", "config.yaml"):
        assert name in artifacts, artifacts
    assert "evaluation/test/confusion_matrix.png" in artifacts

    model = pretrainlab.get_model(f"runs:/{run_id}/checkpoint", device="cpu")  # through the MLflow server
    assert model.info.meta["mlflow_run_id"] == run_id and model.info.meta["epoch"] == 2
    assert model.info.image_size == (8, 8)  # read from the shards in the bucket
    images, labels = load_split_numpy(data, "test")
    predicted = [r["pred_label"] for r in pretrainlab.inference_model(model, [image[0] for image in images])]
    assert np.mean(np.array(predicted) == labels) > 0.6
    assert run.data.metrics["test/top1"] > 60.0

    assert pretrain(*args, "--set", "train.epochs=3") == 0
    assert "resuming run 'digits-s3'" in capsys.readouterr().out
    (resumed,) = client.search_runs([run.info.experiment_id])
    assert resumed.info.run_id == run_id and resumed.info.status == "FINISHED"
    source = resumed.data.tags["pretrainlab.resumed_from"]
    assert source.startswith("epoch 2, step ") and f" from s3://{BUCKET}/runs/digits-s3/checkpoint_" in source
    assert [m.value for m in client.get_metric_history(run_id, "epoch")] == [1.0, 2.0, 3.0]
    assert len(client.get_metric_history(run_id, "val/top1")) == 3
    assert not (project / "runs").exists()  # Ray Train kept nothing on local disk


def test_a_missing_bucket_is_named_before_training(project, s3, capsys):
    assert pretrain("--set", "train.storage_path=s3://no-such-bucket/runs") == 2
    err = capsys.readouterr().err
    assert "error: train.storage_path: s3://no-such-bucket/runs: bucket 'no-such-bucket' does not exist" in err
    assert "Traceback" not in err

    assert pretrain("--set", "data.dataset=s3://no-such-bucket/data/digits") == 2
    err = capsys.readouterr().err
    assert "error: data.dataset: s3://no-such-bucket/data/digits: bucket 'no-such-bucket' does not exist" in err

    assert pretrain("--set", f"data.dataset=s3://{BUCKET}/nothing-here") == 2
    assert f"s3://{BUCKET}/nothing-here/manifest.json: not found" in capsys.readouterr().err


def test_an_unreachable_endpoint_is_named_before_training(project, s3, monkeypatch, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    assert pretrain("--set", f"train.storage_path=s3://{BUCKET}/runs") == 2
    err = capsys.readouterr().err
    assert f"error: train.storage_path: cannot access s3://{BUCKET}/runs (" in err
    assert "check AWS_ENDPOINT_URL" in err and "Traceback" not in err

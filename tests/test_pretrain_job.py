"""The supervised job end to end: 2 Ray Train workers on digits, logged to a real MLflow sqlite store."""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient

from conftest import CONFIGS, use_project
from pretrainlab.checkpoint import load_checkpoint
from pretrainlab.data.catalog import dataset_info
from pretrainlab.tracking.mlflow import RUN_NAME_TAG
from pretrainlab.train.loop import TrainingDiverged, finite_mean_loss, steps_per_epoch

pytestmark = pytest.mark.needs_ray

CONFIG = str(CONFIGS / "test-resnet_2xb32_digits.yaml")


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    return local_ray


def pretrain(*args: str) -> int:
    import pretrain as job  # jobs/ is on sys.path through conftest

    return job.main([CONFIG, *args])


def only_run(client: MlflowClient, experiment: str = "digits"):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_two_workers_two_epochs_tracked_in_mlflow(project, capsys):
    assert pretrain("--run-name", "digits-e2e", "--set", "train.log_every_n_steps=5") == 0
    client = MlflowClient()
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert run.data.tags[RUN_NAME_TAG] == "digits-e2e"
    assert run.data.tags["config.hash"] and run.data.tags["ray.job_id"] and run.data.tags["git.commit"]
    params = run.data.params
    assert params["train.num_workers"] == "2" and params["model.backbone"] == "test_resnet"
    assert params["optim.lr"] == "0.05"

    history = {key: client.get_metric_history(run.info.run_id, key) for key in ("val/top1", "epoch", "train/loss")}
    assert [m.value for m in history["epoch"]] == [1.0, 2.0]
    assert len(history["val/top1"]) == 2
    train_steps = [m.step for m in history["train/loss"]]
    assert train_steps == sorted(train_steps) and len(train_steps) >= 4
    assert client.get_metric_history(run.info.run_id, "train/throughput")[-1].value > 0
    # 10 classes: chance is 10%
    assert history["val/top1"][-1].value > 60.0, history["val/top1"]
    assert run.data.metrics["test/top1"] > 60.0
    assert run.data.metrics["best/val/top1"] == max(m.value for m in history["val/top1"])

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoint", "config.yaml", "evaluation"} <= artifacts
    checkpoint_files = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/model.safetensors", "checkpoint/config.json"} <= checkpoint_files
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/test")}
    assert "evaluation/test/confusion_matrix.png" in plots

    versions = client.search_model_versions("name = 'digits-classifier'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/digits-classifier/{versions[0].version}")
    loaded = load_checkpoint(local)
    assert loaded.meta["epoch"] == 2 and loaded.meta["mlflow_run_id"] == run.info.run_id
    assert "finished: test top-1" in capsys.readouterr().out

    # jobs/evaluate.py on the registered version: same test metrics, logged as a nested run
    import evaluate as evaluate_job

    assert evaluate_job.main([f"models:/digits-classifier/{versions[0].version}", "--split", "test"]) == 0
    child = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
    )
    assert len(child) == 1
    assert child[0].data.metrics["test/top1"] == pytest.approx(run.data.metrics["test/top1"])
    assert "evaluation/test/confusion_matrix.csv" in {
        a.path for a in client.list_artifacts(child[0].info.run_id, "evaluation/test")
    }
    assert evaluate_job.main([local, "--split", "val", "--no-mlflow"]) == 0
    assert "on val: loss" in capsys.readouterr().out
    assert evaluate_job.main([str(project / "nowhere")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err


RECIPE_SWITCHES = [
    "train.ema.decay=0.9",
    "train.accumulate_steps=2",
    "train.clip_grad.max=5.0",
    "data.repeated_augmentation=2",
    "optim.name=lamb",
    "optim.lr=0.002",
    "optim.base_batch_size=64",
    "train.log_every_n_steps=1",
]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, empty_mlflow_store):
    """The recipe switches trained for 1 epoch, then the same command with 2 epochs, which resumes the run: what
    the recipe and the resume tests both read. Its project folder, MLflow client, the first attempt's run and the
    steps of its epochs, the run once resumed, and the second command's output."""
    settings = [arg for switch in RECIPE_SWITCHES for arg in ("--set", switch)]
    output = io.StringIO()
    with pytest.MonkeyPatch.context() as env:
        home = use_project(tmp_path_factory.mktemp("recipe") / "project", env, empty_mlflow_store)
        client = MlflowClient(f"sqlite:///{home}/mlflow.db")
        assert pretrain("--run-name", "digits-recipe", *settings, "--set", "train.epochs=1") == 0
        first = only_run(client)
        first_steps = [m.step for m in client.get_metric_history(first.info.run_id, "epoch")]
        with contextlib.redirect_stdout(output):
            assert pretrain("--run-name", "digits-recipe", *settings, "--set", "train.epochs=2") == 0
    run = only_run(client)
    return SimpleNamespace(home=home, client=client, first=first, first_steps=first_steps, run=run, output=output)


def test_recipe_switches_train_end_to_end(recipe_run):
    """EMA, gradient accumulation and clipping, repeated augmentation, lr scaling and LAMB, on 2 Ray Train workers
    (epoch 2 trained by the resumed run)."""
    client, run = recipe_run.client, recipe_run.run
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    per_epoch = steps_per_epoch(dataset_info(str(recipe_run.home / "data" / "digits"))["train_count"], 32, 2, 2)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "step")] == [per_epoch, 2 * per_epoch]
    lrs = [m.value for m in client.get_metric_history(run.info.run_id, "train/lr")]
    assert len(lrs) == 2 * per_epoch
    assert max(lrs) == pytest.approx(0.002 * (32 * 2 * 2) / 64, rel=0.05)  # the warmup peak of the scaled lr
    chosen = "ema" if metrics["ema/chosen"] == 1.0 else "raw"
    assert metrics["val/top1"] == metrics[f"val_{chosen}/top1"]
    assert metrics["val/top1"] == max(metrics["val_raw/top1"], metrics["val_ema/top1"])
    assert metrics["val_raw/top1"] != metrics["val_ema/top1"] or metrics["val_raw/loss"] != metrics["val_ema/loss"]
    assert metrics["test/top1"] > 25.0  # chance is 10%; 18 steps have landed anywhere from 40% up

    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="checkpoint", tracking_uri=client.tracking_uri
    )
    checkpoint = load_checkpoint(local, with_training_state=True)
    assert checkpoint.meta["weights"] in ("raw", "ema")
    assert set(checkpoint.training_state) >= {"optimizer", "scheduler", "ema", "raw_weights", "rng"}
    kept = checkpoint.training_state["ema" if checkpoint.meta["weights"] == "ema" else "raw_weights"]
    assert all(torch.equal(kept[k], v) for k, v in checkpoint.weights.items())


def test_resume_continues_the_same_mlflow_run(recipe_run):
    assert "resuming run 'digits-recipe'" in recipe_run.output.getvalue()
    run = recipe_run.run
    assert run.info.run_id == recipe_run.first.info.run_id and run.info.status == "FINISHED"
    epochs = recipe_run.client.get_metric_history(run.info.run_id, "epoch")
    assert [m.value for m in epochs] == [1.0, 2.0]  # epoch 1 was not trained again
    assert epochs[1].step > recipe_run.first_steps[0]
    assert "train.epochs: 1 -> 2" in run.data.tags["pretrainlab.changed_on_resume"]


def test_finite_mean_loss_passes_a_finite_window_and_names_a_diverged_one():
    assert finite_mean_loss(torch.tensor(6.0), 3, step=10, epoch=1) == 2.0
    for bad in (float("nan"), float("inf")):
        window = torch.tensor(1.0) + bad  # one bad micro-batch spoils the window's sum
        message = rf"train/loss is {bad} over the 4 micro-batches up to step 7 \(epoch 2\)"
        with pytest.raises(TrainingDiverged, match=message):
            finite_mean_loss(window, 4, step=7, epoch=2)


def test_a_diverging_run_stops_with_a_clear_error_and_no_checkpoint(project, capsys):
    overrides = ("optim.lr=1e6", "train.epochs=1", "train.log_every_n_steps=2")
    assert pretrain("--run-name", "diverges", *[arg for o in overrides for arg in ("--set", o)]) == 1
    err = capsys.readouterr().err
    assert "error: training diverged: train/loss is " in err and "so epoch 1 writes no checkpoint" in err, err
    assert "Traceback" not in err
    client = MlflowClient()
    run = only_run(client)
    assert run.info.status == "FAILED"
    assert "checkpoint" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not client.search_model_versions("name = 'digits-classifier'")


def test_unreachable_tracking_server_is_named(project, monkeypatch, capsys):
    from conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert pretrain() == 2
    err = capsys.readouterr().err
    assert f"cannot reach the MLflow tracking server at {uri}" in err


def test_bad_config_is_reported_without_a_traceback(project, capsys):
    assert pretrain("--set", "optim.lrr=0.1") == 2
    assert "optim.lrr: unknown key" in capsys.readouterr().err
    assert pretrain("--tag", "no-value") == 2
    assert "--tag 'no-value': expected KEY=VALUE" in capsys.readouterr().err

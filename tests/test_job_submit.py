"""`ray job submit` end to end: a `ray start --head` cluster and an `mlflow server`, both started here on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import REPO, MlflowServer, start_ray_node, stop, wait_for

pytestmark = [pytest.mark.needs_ray, pytest.mark.needs_server]

BIN = Path(sys.executable).parent


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "project"
    home.mkdir()
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5",
        "PRETRAINLAB_HOME": str(home),
    }


@pytest.fixture
def mlflow_server(env, tmp_path):
    home = Path(env["PRETRAINLAB_HOME"])
    with MlflowServer(tmp_path, f"sqlite:///{home}/server.db", artifacts=str(home / "artifacts"), env=env) as server:
        yield server.uri


@pytest.fixture
def ray_head(env, tmp_path):
    head = start_ray_node(env, tmp_path / "ray-head.log", None, "--num-cpus=2")
    dashboard = head.ports["--dashboard-port"]
    try:
        wait_for(f"http://127.0.0.1:{dashboard}/api/version", head.process)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stop(head.process)
        shutil.rmtree(head.temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_pretrain_on_the_cluster_and_tracks_to_the_server(env, ray_head, mlflow_server):
    runtime_env = {"env_vars": {"PRETRAINLAB_HOME": env["PRETRAINLAB_HOME"], "MLFLOW_TRACKING_URI": mlflow_server}}
    submit = subprocess.run(
        [
            BIN / "ray",
            "job",
            "submit",
            "--address",
            ray_head,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "jobs/pretrain.py",
            "configs/test-resnet_2xb32_digits.yaml",
            "--set",
            "train.epochs=1",
            "--set",
            "optim.lr=0.08",
            "--run-name",
            "submitted",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log[-5000:]
    assert "succeeded" in log, log[-5000:]
    assert "run 'submitted' finished" in log

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert [r.info.run_name for r in runs] == ["submitted"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.08"
    assert run.data.tags["ray.submission_id"].startswith("raysubmit_")
    assert "val/top1" in run.data.metrics and "test/top1" in run.data.metrics
    assert {"checkpoint", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert [v.run_id for v in client.search_model_versions("name = 'digits-classifier'")] == [run.info.run_id]

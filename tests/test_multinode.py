"""Two Ray nodes on one machine (tests/multinode_cluster.py): a head and a second node with their own resources
and labels; a 2-worker job with `train.placement_strategy=STRICT_SPREAD` puts one worker on each, with its
storage on a folder both nodes share.

Ray refuses a multi-node cluster on one machine unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and then listens on
every interface; so the cluster runs in a network namespace of its own (`unshare --net --map-root-user`) whose
only interface is loopback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conftest import CONFIGS, REPO
from pretrainlab.checkpoint import load_checkpoint
from pretrainlab.tracking.mlflow import RUN_NAME_TAG

pytestmark = pytest.mark.needs_ray


def in_loopback_namespace(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``command`` in a new network namespace with only the loopback interface, brought up."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    assert unshare and ip, "the multi-node test needs `unshare` (util-linux) and `ip` (iproute2)"
    script = f'{ip} link set lo up && exec "$@"'
    wrapped = [unshare, "--net", "--map-root-user", "sh", "-c", script, "sh", *command]
    return subprocess.run(wrapped, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def test_two_workers_train_one_on_each_node(tmp_path):
    home = tmp_path / "project"
    home.mkdir()
    shared = tmp_path / "shared-storage"
    env = {
        **os.environ,
        "PRETRAINLAB_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    job = [sys.executable, str(REPO / "jobs" / "pretrain.py"), str(CONFIGS / "test-resnet_2xb32_digits.yaml")]
    job += ["--run-name", "two-nodes", "--set", "train.epochs=2", "--set", "train.placement_strategy=STRICT_SPREAD"]
    job += ["--set", f"train.storage_path={shared}"]
    run = in_loopback_namespace(
        [sys.executable, str(REPO / "tests" / "multinode_cluster.py"), str(tmp_path), "--", *job], env
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["returncode"] == 0, result["output"]
    nodes = result["nodes"]
    custom = sorted(name for resources in nodes.values() for name in resources if name in ("head", "second"))
    assert custom == ["head", "second"]  # each node came up with its own resources

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (found,) = client.search_runs(
        [client.get_experiment_by_name("digits").experiment_id], f"tags.`{RUN_NAME_TAG}` = 'two-nodes'"
    )
    assert found.info.status == "FINISHED"
    workers = found.data.tags["ray.worker_nodes"].split(",")
    assert len(workers) == 2 and set(workers) == set(nodes)  # rank 0 and rank 1 on different nodes
    checkpoints = sorted(path for path in (shared / "two-nodes").glob("checkpoint_*") if path.is_dir())
    assert len(checkpoints) == 2
    loaded = load_checkpoint(checkpoints[-1], with_training_state=True)  # every file there, the weights' sha256 right
    assert loaded.meta["epoch"] == 2 and loaded.meta["mlflow_run_id"] == found.info.run_id
    assert found.data.metrics["test/top1"] > 50.0  # 10 classes: chance is 10%

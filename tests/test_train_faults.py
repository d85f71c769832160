"""Training survives real faults: a Ray Train worker killed by PID mid-epoch, and the job's driver process
killed and the same command run again after its newest checkpoint was corrupted. 2 workers on digits, a real
local Ray and a real MLflow sqlite store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import CONFIGS, REPO
from pretrainlab.data.builtin import prepare_builtin
from pretrainlab.data.catalog import dataset_info
from pretrainlab.tracking.mlflow import RUN_NAME_TAG
from pretrainlab.train.loop import steps_per_epoch

pytestmark = pytest.mark.needs_ray

CONFIG = str(CONFIGS / "test-resnet_2xb32_digits.yaml")
BATCH = 8
EPOCHS = 3
SETTINGS = [f"train.batch_size={BATCH}", f"train.epochs={EPOCHS}", "train.log_every_n_steps=1"]


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    return local_ray


def job_args(run_name: str, *settings: str) -> list[str]:
    return [CONFIG, "--run-name", run_name, *(arg for item in (*SETTINGS, *settings) for arg in ("--set", item))]


def pretrain(run_name: str, *settings: str) -> int:
    import pretrain as job  # jobs/ is on sys.path through conftest

    return job.main(job_args(run_name, *settings))


def steps_each_epoch(project: Path) -> int:
    info = dataset_info(str(prepare_builtin("digits", project / "data")))
    return steps_per_epoch(info["train_count"], BATCH, 2)


def find_run(client: MlflowClient, run_name: str):
    experiment = client.get_experiment_by_name("digits")
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    return runs[0] if runs else None


def registered_epoch(project: Path, run_name: str) -> int:
    """The epoch of the newest checkpoint Ray Train's controller has registered (0 before the first)."""
    try:
        snapshot = json.loads((project / "runs" / run_name / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, json.JSONDecodeError):  # not written yet, or being written
        return 0
    latest = snapshot.get("latest_checkpoint_result")
    return int(latest["metrics"]["epoch"]) if latest else 0


def wait_into_epoch(project: Path, client: MlflowClient, run_name: str, per_epoch: int, epoch: int, alive) -> None:
    """Until the checkpoint of the epoch before ``epoch`` is registered and ``epoch`` has logged a few steps, while
    ``alive()`` holds."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and alive():
        if registered_epoch(project, run_name) == epoch - 1:  # a file read: MLflow only asked from here on
            run = find_run(client, run_name)
            history = client.get_metric_history(run.info.run_id, "train/loss") if run is not None else []
            if any(m.step >= (epoch - 1) * per_epoch + 5 for m in history):
                return
        time.sleep(0.1)
    raise AssertionError(f"run {run_name!r} never got into epoch {epoch} after a registered checkpoint")


def train_worker_pids(ray) -> list[int]:
    """The PIDs of the live Ray Train workers of the cluster ``ray`` is connected to."""
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # not another Ray on this machine
    actors = list_actors(address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [actor.pid for actor in actors]


def assert_history_continues(client: MlflowClient, run_id: str, per_epoch: int, replayed: range, epochs: list[int]):
    """Every step of every epoch logged, repeats only within the ``replayed`` epochs, and the ``epoch`` metric
    logged exactly ``epochs`` (each epoch once per time it was trained to its end)."""
    counts = Counter(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert set(counts) == set(range(1, EPOCHS * per_epoch + 1))
    repeated = {step for step, count in counts.items() if count > 1}
    replayed_steps = range((replayed.start - 1) * per_epoch + 1, (replayed.stop - 1) * per_epoch + 1)
    assert repeated and repeated <= set(replayed_steps), sorted(repeated)
    logged = client.get_metric_history(run_id, "epoch")
    assert sorted(m.value for m in logged) == [float(e) for e in epochs]
    assert max(m.value for m in client.get_metric_history(run_id, "step")) == EPOCHS * per_epoch


def test_a_worker_killed_mid_epoch_is_replaced_and_the_run_finishes(project, local_ray):
    per_epoch = steps_each_epoch(project)
    client = MlflowClient()
    outcome: dict[str, int] = {}
    job = threading.Thread(target=lambda: outcome.update(rc=pretrain("worker-loss", "train.max_failures=1")))
    job.start()
    wait_into_epoch(project, client, "worker-loss", per_epoch, 2, job.is_alive)
    pids = train_worker_pids(local_ray)
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    job.join(timeout=600)
    assert outcome["rc"] == 0

    run = find_run(client, "worker-loss")
    assert run.info.status == "FINISHED"
    assert run.data.tags["pretrainlab.resumed_from"].startswith(f"epoch 1, step {per_epoch} from ")
    assert_history_continues(client, run.info.run_id, per_epoch, replayed=range(2, 3), epochs=[1, 2, 3])

    assert pretrain("uninterrupted", "train.log_every_n_steps=20") == 0  # only its final metrics are compared
    reference = find_run(client, "uninterrupted").data.metrics
    print(
        f"worker killed: val/top1 {run.data.metrics['val/top1']:.2f} test/top1 {run.data.metrics['test/top1']:.2f}; "
        f"uninterrupted: val/top1 {reference['val/top1']:.2f} test/top1 {reference['test/top1']:.2f}"
    )
    assert run.data.metrics["test/top1"] > 60.0
    assert abs(run.data.metrics["val/top1"] - reference["val/top1"]) < 10.0, (run.data.metrics, reference)
    assert abs(run.data.metrics["test/top1"] - reference["test/top1"]) < 10.0


def test_a_killed_driver_resumes_in_the_same_mlflow_run_past_a_corrupted_newest_checkpoint(project, local_ray):
    per_epoch = steps_each_epoch(project)
    client = MlflowClient()
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    command = [sys.executable, str(REPO / "jobs" / "pretrain.py"), *job_args("driver-loss")]
    with (project / "first.log").open("w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            wait_into_epoch(project, client, "driver-loss", per_epoch, 3, lambda: driver.poll() is None)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=60)
    first = find_run(client, "driver-loss")
    assert first.info.status == "RUNNING"  # killed: nothing marked it ended
    newest = sorted(path for path in (project / "runs" / "driver-loss").glob("checkpoint_*") if path.is_dir())[-1]
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)  # epoch 2's last weights zeroed in place: same size, wrong hash
    weights.write_bytes(bytes(data))

    again = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming run 'driver-loss'" in again.stdout
    assert f"resumed from epoch 1, step {per_epoch}" in again.stdout + again.stderr
    run = find_run(client, "driver-loss")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    resumed = run.data.tags["pretrainlab.resumed_from"]
    assert resumed.startswith(f"epoch 1, step {per_epoch} from ")
    assert f"skipped: {newest}" in resumed and "sha256 does not match" in resumed
    # epoch 2 trained again from epoch 1's checkpoint, and the steps of epoch 3 logged before the kill
    assert_history_continues(client, run.info.run_id, per_epoch, replayed=range(2, 4), epochs=[1, 2, 2, 3])

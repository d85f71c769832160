"""Training survives real faults: a Ray Train worker killed by PID mid-epoch, the job's driver process
killed and the same command run again, and a corrupted newest checkpoint. 2 workers on digits, a real
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


def wait_into_epoch_2(project: Path, client: MlflowClient, run_name: str, per_epoch: int, alive) -> None:
    """Until epoch 1's checkpoint is registered and epoch 2 has logged a few steps, while ``alive()`` holds."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and alive():
        run = find_run(client, run_name)
        if run is not None and registered_epoch(project, run_name) == 1:
            if any(m.step >= per_epoch + 5 for m in client.get_metric_history(run.info.run_id, "train/loss")):
                return
        time.sleep(0.1)
    raise AssertionError(f"run {run_name!r} never got into epoch 2 after a registered checkpoint")


def train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [actor.pid for actor in actors]


def assert_history_continues(client: MlflowClient, run_id: str, per_epoch: int, replayed_epoch: int) -> None:
    """Every step of every epoch logged, repeats only within the replayed epoch, epochs logged once each."""
    counts = Counter(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert set(counts) == set(range(1, EPOCHS * per_epoch + 1))
    repeated = {step for step, count in counts.items() if count > 1}
    replayed = range((replayed_epoch - 1) * per_epoch + 1, replayed_epoch * per_epoch + 1)
    assert repeated and repeated <= set(replayed), sorted(repeated)
    epochs = client.get_metric_history(run_id, "epoch")
    assert sorted(m.value for m in epochs) == [float(e) for e in range(1, EPOCHS + 1)]
    assert max(m.value for m in client.get_metric_history(run_id, "step")) == EPOCHS * per_epoch


def test_a_worker_killed_mid_epoch_is_replaced_and_the_run_finishes(project):
    per_epoch = steps_each_epoch(project)
    client = MlflowClient()
    outcome: dict[str, int] = {}
    job = threading.Thread(target=lambda: outcome.update(rc=pretrain("worker-loss", "train.max_failures=1")))
    job.start()
    wait_into_epoch_2(project, client, "worker-loss", per_epoch, job.is_alive)
    pids = train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[-1], signal.SIGKILL)
    job.join(timeout=600)
    assert outcome["rc"] == 0

    run = find_run(client, "worker-loss")
    assert run.info.status == "FINISHED"
    assert run.data.tags["pretrainlab.resumed_from"].startswith(f"epoch 1, step {per_epoch} from ")
    assert_history_continues(client, run.info.run_id, per_epoch, replayed_epoch=2)

    assert pretrain("uninterrupted") == 0
    reference = find_run(client, "uninterrupted").data.metrics
    print(
        f"worker killed: val/top1 {run.data.metrics['val/top1']:.2f} test/top1 {run.data.metrics['test/top1']:.2f}; "
        f"uninterrupted: val/top1 {reference['val/top1']:.2f} test/top1 {reference['test/top1']:.2f}"
    )
    assert run.data.metrics["test/top1"] > 60.0
    assert abs(run.data.metrics["val/top1"] - reference["val/top1"]) < 10.0, (run.data.metrics, reference)
    assert abs(run.data.metrics["test/top1"] - reference["test/top1"]) < 10.0


def test_a_killed_driver_resumes_from_storage_in_the_same_mlflow_run(project, local_ray):
    per_epoch = steps_each_epoch(project)
    client = MlflowClient()
    env = {**os.environ, "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    command = [sys.executable, str(REPO / "jobs" / "pretrain.py"), *job_args("driver-loss")]
    with (project / "first.log").open("w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            wait_into_epoch_2(project, client, "driver-loss", per_epoch, lambda: driver.poll() is None)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=60)
    first = find_run(client, "driver-loss")
    assert first.info.status == "RUNNING"  # killed: nothing marked it ended

    again = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming run 'driver-loss'" in again.stdout
    assert f"resumed from epoch 1, step {per_epoch}" in again.stdout + again.stderr
    run = find_run(client, "driver-loss")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert_history_continues(client, run.info.run_id, per_epoch, replayed_epoch=2)


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_good_one(project):
    per_epoch = steps_each_epoch(project)
    quick = ("train.log_every_n_steps=20",)  # no fault mid-epoch here: no need for a step-by-step history
    assert pretrain("corrupted", f"train.epochs={EPOCHS - 1}", *quick) == 0
    newest = sorted(path for path in (project / "runs" / "corrupted").glob("checkpoint_*") if path.is_dir())[-1]
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)  # the last weights zeroed in place: same size, wrong hash
    weights.write_bytes(bytes(data))

    assert pretrain("corrupted", *quick) == 0
    run = find_run(MlflowClient(), "corrupted")
    resumed = run.data.tags["pretrainlab.resumed_from"]
    assert resumed.startswith(f"epoch 1, step {per_epoch} from ")
    assert f"skipped: {newest}" in resumed and "sha256 does not match" in resumed
    epochs = sorted(m.value for m in MlflowClient().get_metric_history(run.info.run_id, "epoch"))
    assert epochs == [1.0, 2.0, 2.0, 3.0]  # epoch 2 trained again from epoch 1's checkpoint

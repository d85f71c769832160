"""Sweeps: the sweep section's checks, and ASHA / PBT sweeps on a real local Ray with a real MLflow store."""

from __future__ import annotations

import io

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from conftest import CONFIGS
from pretrainlab.config import ConfigError, OptimConfig, ScheduleConfig, load_config
from pretrainlab.inference.loading import load_model
from pretrainlab.sweep.space import check_space, trial_config
from pretrainlab.sweep.tune import STOP_REASON_TAG, TRIAL_TAG
from pretrainlab.tracking.mlflow import RUN_NAME_TAG
from pretrainlab.train.optim import apply_hyperparameters, build_optimizer
from pretrainlab.train.schedule import build_scheduler, lr_factor

ASHA = str(CONFIGS / "sweeps" / "test-resnet_digits_asha.yaml")
PBT = str(CONFIGS / "sweeps" / "test-resnet_digits_pbt.yaml")


def with_space(space: str, *more: str):
    return load_config(ASHA, [f"sweep.space={space}", *more])


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("{optim.lrr: {uniform: [0.1, 0.2]}}", r"'lrr' is not a config key; valid keys at optim: name, lr"),
        ("{optim: {uniform: [0.1, 0.2]}}", r"sweep.space.optim: a section; name one of its keys"),
        ("{optim.lr.x: {uniform: [0.1, 0.2]}}", r"optim.lr is a value, not a section"),
        ("{optim.lr: {uniform: [-1.0, 0.2]}}", r"sweep.space.optim.lr: value -1.0 is refused.*greater than 0"),
        ("{optim.name: {choice: [sgd, adagrad]}}", r"value 'adagrad' is refused.*'sgd', 'adamw'"),
        ("{sweep.num_samples: {choice: [1, 2]}}", r"'sweep' is not a config key"),
    ],
)
def test_space_keys_and_values_are_checked_before_anything_starts(space, message):
    with pytest.raises(ConfigError, match=message):
        check_space(with_space(space))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sweep.space={optim.lr: {between: [1, 2]}}", r"expected one of \{choice, grid, uniform"),
        ("sweep.space={optim.lr: {loguniform: [0.0, 1.0]}}", "loguniform needs low > 0"),
        ("sweep.space={optim.lr: {uniform: [0.2, 0.1]}}", "low must be below high"),
        ("sweep.search_alg=grid", "search_alg grid needs grid or choice axes; not: optim.lr"),
        ("sweep.scheduler.type=hyperband", "sweep.scheduler.type"),
        ("sweep.metrik=val/top1", "sweep.metrik: unknown key; valid keys here: space, metric, mode"),
    ],
)
def test_sweep_section_is_typed(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ASHA, [override])


def test_trial_config_sets_sampled_values_and_ranks_checkpoints_by_the_sweep_metric():
    cfg = with_space("{data.mixup.mixup_alpha: {choice: [0.2]}, model.backbone_kwargs.stem_width: {choice: [8]}}")
    check_space(cfg)
    trial = trial_config(cfg, {"data.mixup.mixup_alpha": 0.2, "optim.lr": 0.01, "model.backbone_kwargs.stem_width": 8})
    assert trial.sweep is None and trial.optim.lr == 0.01 and trial.data.mixup.mixup_alpha == 0.2
    assert trial.model.backbone_kwargs == {"stem_width": 8}
    assert trial.train.checkpoint.score_metric == cfg.sweep.metric == "val/top1"


def test_job_without_sweep_section_exits_with_a_clear_error(project, capsys):
    import sweep as job

    assert job.main([str(CONFIGS / "test-resnet_2xb32_digits.yaml")]) == 2
    assert "no sweep section" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "old_trust", "new_trust"),
    [("sgd", {}, {}), ("lars", {"trust_coeff": 0.001}, {"trust_coeff": 0.02, "trust_clip": True})],
)
def test_restored_optimizer_follows_the_new_hyperparameters(name, old_trust, new_trust):
    """What a PBT exploit relies on: the copied state keeps its schedule position, not its lr."""
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(3, 2)})
    old = OptimConfig(name=name, lr=0.1, weight_decay=1e-4, momentum=0.9, **old_trust)
    schedule = ScheduleConfig(name="cosine", warmup_epochs=0)
    optimizer = build_optimizer(model, old, old.lr)
    scheduler = build_scheduler(optimizer, schedule, steps_per_epoch=10, epochs=2)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    new = OptimConfig(name=name, lr=0.02, weight_decay=5e-4, momentum=0.8, **new_trust)
    restored = build_optimizer(model, new, new.lr)
    restored_scheduler = build_scheduler(restored, schedule, steps_per_epoch=10, epochs=2)
    restored.load_state_dict(optimizer.state_dict())
    restored_scheduler.load_state_dict(scheduler.state_dict())
    apply_hyperparameters(restored, restored_scheduler, new, new.lr)
    bias, group = restored.param_groups  # biases train without weight decay
    assert group["lr"] == pytest.approx(0.02 * lr_factor(7, 20, 0, schedule))
    assert (group["weight_decay"], group["momentum"]) == (5e-4, 0.8)
    assert (bias["lr"], bias["weight_decay"]) == (group["lr"], 0.0)
    assert all(group[key] == value for key, value in new_trust.items())
    restored.step()
    restored_scheduler.step()
    assert group["lr"] == pytest.approx(0.02 * lr_factor(8, 20, 0, schedule))


@pytest.fixture(scope="module")
def _ray(local_ray):
    return local_ray


def run_sweep(config: str, name: str, *overrides: str) -> int:
    import sweep as job  # jobs/ is on sys.path through conftest

    return job.main([config, "--name", name, *[arg for o in overrides for arg in ("--set", o)]])


def runs_of(client: MlflowClient, experiment: str = "digits"):
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


@pytest.mark.needs_ray
def test_asha_sweep_tracks_every_trial_stops_bad_ones_and_survives_a_failed_one(_ray, project, capsys):
    # two learning rates that learn and two that cannot: ASHA must stop at least one early; a fifth diverges
    # (its loss turns NaN within a few steps, which fails the trial) and the sweep goes on
    space = "sweep.space={optim.lr: {grid: [0.05, 0.00001, 0.1, 0.00002, 1000000.0]}}"
    assert run_sweep(ASHA, "asha", space, "sweep.num_samples=1") == 0
    client = MlflowClient()
    runs = runs_of(client)
    parent = next(r for r in runs if r.data.tags[RUN_NAME_TAG] == "asha")
    trials = [r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id]
    assert len(runs) == 6 and len(trials) == 5
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.scheduler.type"] == "asha"
    (failed,) = [c for c in trials if c.data.params["optim.lr"] == "1000000.0"]
    assert failed.info.status == "FAILED", failed.data.tags[STOP_REASON_TAG]
    assert (
        failed.data.tags[STOP_REASON_TAG].startswith("error: ")
        and "training diverged" in failed.data.tags[STOP_REASON_TAG]
    )
    assert parent.data.metrics["sweep/failed_trials"] == 1
    children = [c for c in trials if c is not failed]

    reasons = [c.data.tags[STOP_REASON_TAG] for c in children]
    assert any(r.startswith("stopped early by ASHA") for r in reasons), reasons
    assert "completed" in reasons
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["optim.lr"] in {"0.05", "1e-05", "0.1", "2e-05"}
        assert "best/val/top1" in child.data.metrics
        logged_epochs = len(client.get_metric_history(child.info.run_id, "val/top1"))
        reason = child.data.tags[STOP_REASON_TAG]
        if reason == "completed":
            assert logged_epochs == 2
        else:
            # ASHA decides on epoch 1; the stop reaches the workers asynchronously, so they may finish epoch 2
            assert reason == "stopped early by ASHA after epoch 1" and logged_epochs >= 1

    best_child = max(children, key=lambda c: c.data.metrics["best/val/top1"])
    assert parent.data.metrics["sweep/best/val/top1"] == best_child.data.metrics["best/val/top1"]
    assert "best/val/top1" not in parent.data.metrics  # the parent has no checkpoint to promote
    assert parent.data.tags["pretrainlab.best_run_id"] == best_child.info.run_id
    assert parent.data.metrics["sweep/trials"] == 5 and parent.data.metrics["sweep/trial_epochs"] < 8
    loaded = load_model(f"runs:/{best_child.info.run_id}/checkpoint")
    assert loaded.meta["metrics"]["val/top1"] == best_child.data.metrics["best/val/top1"]

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts == {"sweep/results.csv", "sweep/results.parquet", "sweep/parallel_coordinates.png"}
    table = pd.read_csv(io.StringIO(open(client.download_artifacts(parent.info.run_id, "sweep/results.csv")).read()))
    assert sorted(table["trial_id"]) == sorted(c.data.tags[TRIAL_TAG] for c in trials)
    assert "best trial" in capsys.readouterr().out

    import promote  # the winner becomes the registered model's champion

    assert promote.main(["--experiment", "digits", "--metric", "best/val/top1", "--model", "digits-sweep"]) == 0
    assert client.get_model_version_by_alias("digits-sweep", "champion").run_id == best_child.info.run_id


@pytest.mark.needs_ray
def test_pbt_exploits_are_recorded_in_mlflow(_ray, project):
    assert run_sweep(PBT, "pbt") == 0
    client = MlflowClient()
    runs = runs_of(client)
    parent = next(r for r in runs if r.data.tags[RUN_NAME_TAG] == "pbt")
    children = [r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id]
    assert len(children) == 2
    exploited = [c for c in children if "pretrainlab.exploited_from" in c.data.tags]
    assert exploited, "PBT copied no trial's checkpoint"
    other_ids = {c.info.run_id for c in children}
    for child in exploited:
        assert child.data.tags["pretrainlab.exploited_from"].split()[1] in other_ids - {child.info.run_id}
        assert client.get_metric_history(child.info.run_id, "pbt/exploit")
        assert "optim.lr" in child.data.tags["pretrainlab.changed_on_resume"]
    assert all(c.info.status == "FINISHED" for c in children)

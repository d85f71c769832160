"""Run a sweep with Ray Tune: every trial trains through the same entry point as ``jobs/pretrain.py``.

- ASHA and ``none``: each trial is a Tune function that builds the experiment's
  ``TorchTrainer`` and passes ``TuneReportCallback``, so ASHA sees every epoch's
  validation metric and stops bad trials.
- PBT: each trial runs the training loop itself (``TuneTrialSession``) and reports
  checkpoints to Tune, which copies the best trials' checkpoints into the worst.

MLflow: one parent run per sweep, one child run per trial (``mlflow.parentRunId``). The
trial opens its child run; :class:`SweepTracker`, a Tune callback on the driver, finishes
it (best checkpoint, stop reason, status) when the trial completes, is stopped or fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining, TrialScheduler

from pretrainlab.config import ConfigError, ExperimentConfig, SweepConfig
from pretrainlab.data.catalog import dataset_info
from pretrainlab.paths import resolve
from pretrainlab.sweep.space import param_space, trial_config, tune_domain
from pretrainlab.tracking.mlflow import CHECKPOINT_ARTIFACT, client_for, log_params, start_or_resume_run
from pretrainlab.train.loop import run_loop
from pretrainlab.train.session import TuneTrialSession
from pretrainlab.train.trainer import build_datasets, build_trainer, wants_gpu

TRIAL_TAG = "pretrainlab.trial_id"
SWEEP_TAG = "pretrainlab.sweep"
STOP_REASON_TAG = "pretrainlab.stop_reason"


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs from the sweep's driver."""

    base: dict[str, Any]
    data_folder: str
    tracking_uri: str
    parent_run_id: str
    sweep_name: str

    @classmethod
    def create(
        cls, cfg: ExperimentConfig, data_folder: str, tracking_uri: str, parent_run_id: str, sweep_name: str
    ) -> SweepContext:
        """The context of ``cfg``'s sweep, with its storage path made absolute for trials on any node."""
        base = cfg.to_dict()
        base["train"]["storage_path"] = resolve(cfg.train.storage_path)
        return cls(base, data_folder, tracking_uri, parent_run_id, sweep_name)

    def child_run_name(self, trial_id: str) -> str:
        """The MLflow (and Ray Train) run name of a trial."""
        return f"{self.sweep_name}-{trial_id}"

    def child_tags(self, trial_id: str) -> dict[str, str]:
        """Tags that make a run the child of the sweep's parent run."""
        return {MLFLOW_PARENT_RUN_ID: self.parent_run_id, TRIAL_TAG: trial_id, SWEEP_TAG: self.sweep_name}

    def open_child_run(self, trial_id: str, cfg: ExperimentConfig) -> str:
        """Create or reopen the trial's child run, with the trial's config as params."""
        client = client_for(self.tracking_uri)
        tags = {**self.child_tags(trial_id), "strategy": cfg.strategy, "config.hash": cfg.digest()}
        run_id, _ = start_or_resume_run(client, cfg.runtime.experiment, self.child_run_name(trial_id), tags)
        log_params(client, run_id, cfg.flat())
        return run_id


def train_trial(params: dict[str, Any], sweep: SweepContext) -> None:
    """A Tune trial that runs the experiment's ``TorchTrainer`` (ASHA or no scheduler)."""
    cfg = trial_config(ExperimentConfig.model_validate(sweep.base), params)
    trial_id = tune.get_context().get_trial_id()
    run_id = sweep.open_child_run(trial_id, cfg)
    tracking = {"uri": sweep.tracking_uri, "run_id": run_id}
    trainer = build_trainer(cfg, sweep.child_run_name(trial_id), sweep.data_folder, tracking, [TuneReportCallback()])
    trainer.fit()


def pbt_trial(params: dict[str, Any], sweep: SweepContext, datasets: dict[str, ray.data.Dataset]) -> None:
    """A Tune trial that trains in its own process and reports checkpoints to Tune (PBT)."""
    cfg = trial_config(ExperimentConfig.model_validate(sweep.base), params)
    run_id = sweep.open_child_run(tune.get_context().get_trial_id(), cfg)
    loop_config = {
        "config": cfg.to_dict(),
        "dataset": dataset_info(sweep.data_folder),
        "tracking": {"uri": sweep.tracking_uri, "run_id": run_id},
    }
    run_loop(loop_config, TuneTrialSession(datasets))


@dataclass
class TrialOutcome:
    """How one trial ended, as recorded in its child run."""

    trial_id: str
    run_id: str
    params: dict[str, Any]
    best_metric: float | None
    best_checkpoint: str | None
    epochs: int
    stop_reason: str
    status: str


class SweepTracker(tune.Callback):
    """Finishes each trial's child run: best checkpoint as its artifact, stop reason, status."""

    def __init__(self, sweep: SweepContext, config: SweepConfig, experiment: str, epochs: int) -> None:
        self.sweep, self.config, self.experiment, self.epochs = sweep, config, experiment, epochs
        self.best: dict[str, tuple[float, str]] = {}
        self.outcomes: dict[str, TrialOutcome] = {}

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        if CHECKPOINT_PATH_KEY in result:
            self._offer(trial, result, result[CHECKPOINT_PATH_KEY])

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Any, **info: Any) -> None:
        self._offer(trial, trial.last_result, checkpoint.path)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        epochs = int(trial.last_result.get("training_iteration", 0))
        scheduler = self.config.scheduler.type.upper()
        reason = "completed" if epochs >= self.epochs else f"stopped early by {scheduler} after epoch {epochs}"
        self._finish(trial, reason, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._finish(trial, f"error: {_last_error_line(trial)}"[:5000], "FAILED")

    def _offer(self, trial: Trial, result: dict, path: str) -> None:
        value = result.get(self.config.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        held = self.best.get(trial.trial_id)
        better = held is None or (value > held[0] if self.config.mode == "max" else value < held[0])
        if better:
            self.best[trial.trial_id] = (float(value), path)

    def _finish(self, trial: Trial, reason: str, status: str) -> None:
        client = client_for(self.sweep.tracking_uri)
        name = self.sweep.child_run_name(trial.trial_id)
        run_id, _ = start_or_resume_run(client, self.experiment, name, self.sweep.child_tags(trial.trial_id))
        best = self.best.get(trial.trial_id)
        if best is not None:
            client.log_artifacts(run_id, best[1], CHECKPOINT_ARTIFACT)
            client.log_metric(run_id, f"best/{self.config.metric}", best[0])
        client.set_tag(run_id, STOP_REASON_TAG, reason)
        client.set_terminated(run_id, status)
        self.outcomes[trial.trial_id] = TrialOutcome(
            trial_id=trial.trial_id,
            run_id=run_id,
            params=dict(trial.config),
            best_metric=best[0] if best else None,
            best_checkpoint=best[1] if best else None,
            epochs=int(trial.last_result.get("training_iteration", 0)),
            stop_reason=reason,
            status=status,
        )


def _last_error_line(trial: Trial) -> str:
    """The exception line of a failed trial's traceback."""
    local = Path(trial.error_file) if trial.error_file else None
    text = local.read_text() if local is not None and local.is_file() else str(trial.get_error() or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error (see the trial's error.txt)"


def trials_that_fit(cfg: ExperimentConfig, requested: int) -> int:
    """``requested`` concurrent trials, or fewer so that their workers fit the cluster's CPUs and GPUs."""
    resources = ray.cluster_resources()
    cpus_per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker
    fit = int(resources.get("CPU", 0) // cpus_per_trial)
    if wants_gpu(cfg):
        fit = min(fit, int(resources.get("GPU", 0) // cfg.train.num_workers))
    if fit < 1:
        raise ConfigError(
            f"one trial needs {cpus_per_trial} CPUs{' and GPUs' if wants_gpu(cfg) else ''} "
            f"(train.num_workers x train.cpus_per_worker) but the cluster has {resources.get('CPU', 0):g}"
        )
    return min(requested, fit)


def build_scheduler(config: SweepConfig, epochs: int) -> TrialScheduler:
    """ASHA on the per-epoch metric, PBT every ``perturbation_interval`` epochs, or FIFO."""
    rules = config.scheduler
    if rules.type == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=epochs,
            grace_period=min(rules.grace_period, epochs),
            reduction_factor=rules.reduction_factor,
        )
    if rules.type == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration",
            perturbation_interval=rules.perturbation_interval,
            hyperparam_mutations={key: tune_domain(dim, grid_as_choice=True) for key, dim in config.space.items()},
            quantile_fraction=rules.quantile_fraction,
            resample_probability=rules.resample_probability,
            synch=rules.synch,
        )
    return FIFOScheduler()


def build_search_alg(config: SweepConfig) -> Any:
    """Optuna's TPE when asked for (and installed); otherwise Tune's own random / grid variants."""
    if config.search_alg != "optuna":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch()
    except ImportError:
        raise ConfigError("sweep.search_alg optuna: the optuna package is not installed (pip install optuna)") from None


def build_tuner(cfg: ExperimentConfig, sweep: SweepContext, tracker: SweepTracker) -> tune.Tuner:
    """The ``Tuner`` for ``cfg.sweep``: trial function, resources, scheduler, search, concurrency."""
    config = cfg.sweep
    epochs = cfg.train.epochs
    concurrent = trials_that_fit(cfg, config.max_concurrent_trials)
    if config.scheduler.type == "pbt":
        datasets = build_datasets(cfg, sweep.data_folder)
        resources = {"cpu": cfg.train.cpus_per_worker, "gpu": 1 if wants_gpu(cfg) else 0}
        trainable = tune.with_resources(tune.with_parameters(pbt_trial, sweep=sweep, datasets=datasets), resources)
    else:
        # the trial only drives its TorchTrainer, whose workers hold the CPUs; a trial holding
        # one too would leave a small machine's Train workers waiting forever
        trainable = tune.with_resources(tune.with_parameters(train_trial, sweep=sweep), {"cpu": 0, "memory": 2**20})
    return tune.Tuner(
        trainable,
        param_space=param_space(config),
        tune_config=tune.TuneConfig(
            metric=config.metric,
            mode=config.mode,
            num_samples=config.num_samples,
            max_concurrent_trials=concurrent,
            scheduler=build_scheduler(config, epochs),
            search_alg=build_search_alg(config),
        ),
        run_config=tune.RunConfig(
            name=sweep.sweep_name,
            storage_path=resolve(cfg.train.storage_path),
            callbacks=[tracker],
            checkpoint_config=tune.CheckpointConfig(
                # PBT copies any trial's latest checkpoint into another: keep them all
                num_to_keep=None if config.scheduler.type == "pbt" else cfg.train.checkpoint.num_to_keep,
                checkpoint_score_attribute=config.metric,
                checkpoint_score_order=config.mode,
            ),
            verbose=1,
        ),
    )

"""One experiment from config to registered model: the run that ``jobs/pretrain.py`` and ``jobs/finetune.py`` make.

:func:`run_experiment` checks the config against its data and the tracking store (before any Ray worker starts),
opens (or resumes, by name) the MLflow run, trains on Ray Train, tests the best kept checkpoint on the dataset's
test splits through the task's evaluator (:mod:`pretrainlab.evaluation.tasks`), logs the checkpoint, registers it
when ``runtime.registered_model`` is set, and closes the run FINISHED, or FAILED on any error.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import yaml
from mlflow import MlflowClient

from pretrainlab.checkpoint import CheckpointError, verify_checkpoint
from pretrainlab.cluster import init_ray, ray_job_tags
from pretrainlab.config import ExperimentConfig
from pretrainlab.evaluation.tasks import EVALUATORS, dataset_test_splits, log_report
from pretrainlab.inference.loading import load_model
from pretrainlab.paths import project_home, resolve_tracking_uri
from pretrainlab.storage import location
from pretrainlab.strategies import task_of
from pretrainlab.tracking.mlflow import (
    CHECKPOINT_ARTIFACT,
    TrackingError,
    check_tracking,
    client_for,
    log_params,
    register_checkpoint,
    start_or_resume_run,
)
from pretrainlab.train.trainer import EXPERIMENT_ERRORS, build_trainer, check_experiment, divergence

if TYPE_CHECKING:  # ray is imported after pretrainlab, whose import keeps a local Ray on 127.0.0.1
    from ray.train import Checkpoint, Result


def git_commit() -> str:
    """The commit of the project folder, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_home(), capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(cfg: ExperimentConfig, extra: Mapping[str, str]) -> dict[str, str]:
    """The tags of a training run: commit, config hash, strategy, Ray job ids, then ``extra``."""
    return {
        "git.commit": git_commit(),
        "config.hash": cfg.digest(),
        "strategy": cfg.strategy,
        **ray_job_tags(),
        **extra,
    }


@contextmanager
def best_good_checkpoint(result: Result, score: str, mode: str) -> Iterator[tuple[Checkpoint, dict, str]]:
    """The best kept checkpoint by ``score`` that passes verification, its metrics, and a local folder holding it
    while the context lasts (a checkpoint on S3 is downloaded once); a corrupted one is named and passed over.

    Raises:
        CheckpointError: None of the kept checkpoints can be loaded.
    """
    ranked = sorted(result.best_checkpoints, key=lambda pair: pair[1][score], reverse=mode == "max")
    for checkpoint, metrics in ranked:
        with checkpoint.as_directory() as folder:
            try:
                verify_checkpoint(folder)
            except CheckpointError as err:
                print(f"warning: passing over a damaged checkpoint: {err}", flush=True)
                continue
            yield checkpoint, metrics, folder
            return
    raise CheckpointError(f"none of the {len(ranked)} kept checkpoints of the run can be loaded")


def evaluate_on_test_splits(
    client: MlflowClient, run_id: str, cfg: ExperimentConfig, folder: str, data_folder: str, step: int
) -> str:
    """Evaluate the checkpoint in ``folder`` on the dataset's test splits and log each report at ``step`` (pictures
    of the test split only); the test split's summary line."""
    task = task_of(cfg.strategy)
    loaded = load_model(folder)
    summary = ""
    for split in dataset_test_splits(task, data_folder):
        report = EVALUATORS[task].evaluate_split(loaded, split, data_folder, cfg.train.eval_batch_size)
        log_report(client, run_id, report, step, pictures=split == "test")
        if split == "test":
            summary = report.summary(EVALUATORS[task].summary, EVALUATORS[task].unit)
    return summary


def run_experiment(cfg: ExperimentConfig, run_name: str | None = None, extra_tags: Mapping[str, str] = {}) -> int:
    """Train, test, log and register one experiment; the job's exit code (2: bad input, 1: training diverged).

    ``run_name`` of an earlier run resumes it from its last checkpoint, in the same MLflow run.
    """
    try:
        tracking_uri = resolve_tracking_uri(cfg.runtime.tracking_uri)
        check_tracking(tracking_uri)
        data_folder = check_experiment(cfg)  # fail here, not inside a Ray worker
    except (TrackingError, *EXPERIMENT_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    init_ray()
    client = client_for(tracking_uri)
    run_id, resumed = start_or_resume_run(client, cfg.runtime.experiment, run_name, run_tags(cfg, extra_tags))
    print(f"{'resuming' if resumed else 'starting'} run {run_name!r} (MLflow run {run_id} at {tracking_uri})")
    try:
        for key, (old, new) in log_params(client, run_id, cfg.flat()).items():
            print(f"  config changed since the last attempt: {key}: {old} -> {new}")
        client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
        trainer = build_trainer(cfg, run_name, data_folder, {"uri": tracking_uri, "run_id": run_id})
        try:
            result = trainer.fit()
        except Exception as err:
            if (diverged := divergence(err)) is None:
                raise
            client.set_terminated(run_id, "FAILED")
            print(f"error: {diverged}", file=sys.stderr)
            return 1
        score = cfg.train.checkpoint.score_metric
        with best_good_checkpoint(result, score, cfg.train.checkpoint.score_mode) as (best, best_metrics, folder):
            # the best epoch's value, so that jobs/promote.py --metric best/val/top1 ranks runs by their checkpoints
            client.log_metric(run_id, f"best/{score}", best_metrics[score])
            step = int(result.metrics["step"])
            summary = evaluate_on_test_splits(client, run_id, cfg, folder, data_folder, step)
            client.log_artifacts(run_id, folder, CHECKPOINT_ARTIFACT)
        version = None
        if cfg.runtime.registered_model:
            version = register_checkpoint(client, run_id, cfg.runtime.registered_model)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    print(f"\nrun {run_name!r} finished: test {summary}")
    print(f"  MLflow run: {run_id} (experiment {cfg.runtime.experiment!r}, store {tracking_uri})")
    print(
        f"  checkpoint: runs:/{run_id}/{CHECKPOINT_ARTIFACT}  (Ray Train copy: {location(best.filesystem, best.path)})"
    )
    if version is not None:
        print(f"  registered: models:/{version.name}/{version.version}")
    if not tracking_uri.startswith("http"):
        print(f"  browse it:  mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")
    return 0

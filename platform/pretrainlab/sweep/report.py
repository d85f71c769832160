"""The sweep's parent run: the results table, the parallel-coordinates plot and the best trial."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from pretrainlab.analysis import parallel_coordinates
from pretrainlab.config import SweepConfig
from pretrainlab.sweep.tune import TrialOutcome

SWEEP_ARTIFACTS = "sweep"


def results_table(outcomes: list[TrialOutcome], config: SweepConfig) -> pd.DataFrame:
    """A row per trial: id, child run, status, stop reason, epochs run, best metric, then the sampled params."""
    rows = [
        {
            "trial_id": o.trial_id,
            "run_id": o.run_id,
            "status": o.status,
            "stop_reason": o.stop_reason,
            "epochs": o.epochs,
            f"best {config.metric}": o.best_metric,
            **{key: o.params.get(key) for key in config.space},
        }
        for o in sorted(outcomes, key=lambda o: o.trial_id)
    ]
    return pd.DataFrame(rows)


def best_outcome(outcomes: list[TrialOutcome], config: SweepConfig) -> TrialOutcome | None:
    """The trial with the best metric, among those that reported one."""
    scored = [o for o in outcomes if o.best_metric is not None]
    if not scored:
        return None
    pick = max if config.mode == "max" else min
    return pick(scored, key=lambda o: o.best_metric)


def log_summary(client: MlflowClient, parent_run_id: str, outcomes: list[TrialOutcome], config: SweepConfig) -> None:
    """Results table (CSV and Parquet), parallel-coordinates plot and best trial, on the parent run."""
    table = results_table(outcomes, config)
    metric_column = f"best {config.metric}"
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "results.csv", index=False)
        table.astype({key: str for key in config.space}).to_parquet(Path(tmp) / "results.parquet", index=False)
        scored = table.dropna(subset=[metric_column])
        if len(scored):
            log_axes = [key for key, dim in config.space.items() if dim.kind == "loguniform"]
            parallel_coordinates.plot(
                scored, list(config.space), metric_column, Path(tmp) / "parallel_coordinates.png", log_axes
            )
        client.log_artifacts(parent_run_id, tmp, SWEEP_ARTIFACTS)
    counts = table["status"].value_counts().to_dict()
    client.log_metric(parent_run_id, "sweep/trials", len(table))
    client.log_metric(parent_run_id, "sweep/failed_trials", counts.get("FAILED", 0))
    client.log_metric(parent_run_id, "sweep/trial_epochs", int(table["epochs"].sum()))
    best = best_outcome(outcomes, config)
    if best is not None:
        # under sweep/ so that the parent (which has no checkpoint) never competes in jobs/promote.py
        client.log_metric(parent_run_id, f"sweep/best/{config.metric}", best.best_metric)
        client.set_tag(parent_run_id, "pretrainlab.best_trial", best.trial_id)
        client.set_tag(parent_run_id, "pretrainlab.best_run_id", best.run_id)

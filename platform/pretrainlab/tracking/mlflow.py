"""MLflow tracking: one run per training job, found again by name when the job resumes.

The driver creates (or resumes) the run and owns its params, tags, artifacts and final
status; rank 0 of the Ray Train worker group logs step and epoch metrics into the same
run through :class:`MetricLogger`. The run id also travels inside every checkpoint, so
a restarted worker group continues the same run.
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pretrainlab.analysis import confusion_matrix
from pretrainlab.paths import project_home

if TYPE_CHECKING:
    from pretrainlab.train.evaluate import Evaluation

DEFAULT_STORE = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
RUN_NAME_TAG = "pretrainlab.run_name"
CHECKPOINT_ARTIFACT = "checkpoint"
_MAX_PARAM_LENGTH = 6000


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names its URI."""


def resolve_tracking_uri(configured: str | None = None) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file in the project folder."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_home() / DEFAULT_STORE}"


def check_tracking(uri: str, timeout_s: float = 10.0) -> None:
    """Fail early, naming ``uri``, when the tracking server does not answer its health check."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                response.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri} ({reason}); start it "
                "(mlflow server --host 127.0.0.1 --port 5000) or unset MLFLOW_TRACKING_URI"
            ) from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise TrackingError(f"tracking store {uri}: folder {folder} does not exist")


def client_for(uri: str) -> MlflowClient:
    """A client whose tracking and registry both live at ``uri``."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if needed.

    With a sqlite store, artifacts go to ``mlartifacts/`` in the project folder rather
    than MLflow's default ``./mlruns`` under whatever the current directory happens to be.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        location = (project_home() / DEFAULT_ARTIFACTS).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(name).experiment_id


def start_or_resume_run(
    client: MlflowClient, experiment: str, run_name: str, tags: Mapping[str, str]
) -> tuple[str, bool]:
    """Open the run called ``run_name`` (resumed, status set back to RUNNING) or create it.

    Returns:
        ``(run_id, resumed)``.
    """
    experiment_id = ensure_experiment(client, experiment)
    escaped = run_name.replace("'", "\\'")
    found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{escaped}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        return run_id, True
    run = client.create_run(experiment_id, run_name=run_name, tags={**tags, RUN_NAME_TAG: run_name})
    return run.info.run_id, False


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Log params; on a resumed run, params that changed are recorded as a tag instead.

    Returns:
        The changed params as ``{key: (old, new)}`` (empty for a new run).
    """
    logged = client.get_run(run_id).data.params
    changed = {
        k: (logged[k], v[:_MAX_PARAM_LENGTH])
        for k, v in params.items()
        if k in logged and logged[k] != v[:_MAX_PARAM_LENGTH]
    }
    fresh = [Param(k, v[:_MAX_PARAM_LENGTH]) for k, v in params.items() if k not in logged]
    for start in range(0, len(fresh), 100):
        client.log_batch(run_id, params=fresh[start : start + 100])
    if changed:
        note = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in sorted(changed.items()))
        client.set_tag(run_id, "pretrainlab.changed_on_resume", note[:5000])
    return changed


class MetricLogger:
    """Logs metric dicts to one run at a given step (used by rank 0 of the worker group)."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log every metric in ``metrics`` at ``step``."""
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)


def register_checkpoint(
    client: MlflowClient, run_id: str, model_name: str, artifact_path: str = CHECKPOINT_ARTIFACT
) -> ModelVersion:
    """Register ``runs:/RUN/artifact_path`` as a new version of ``model_name`` (created if needed)."""
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="Registered by PretrainLab.")
    return client.create_model_version(model_name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id)


def log_evaluation(client: MlflowClient, run_id: str, evaluation: Evaluation, step: int | None = None) -> None:
    """Log ``{split}/{metric}`` values and the confusion matrix (PNG + CSV) of an evaluation to a run."""
    prefix = evaluation.split
    MetricLogger(client, run_id).log({f"{prefix}/{k}": v for k, v in evaluation.metrics.items()}, step or 0)
    matrix = confusion_matrix.compute(evaluation.labels, evaluation.preds, len(evaluation.class_names))
    with tempfile.TemporaryDirectory() as tmp:
        confusion_matrix.save(matrix, evaluation.class_names, tmp, title=f"{prefix} split")
        client.log_artifacts(run_id, tmp, f"evaluation/{prefix}")

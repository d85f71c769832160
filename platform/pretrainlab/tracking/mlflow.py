"""MLflow tracking: one run per training job, found again by name when the job resumes.

The driver creates (or resumes) the run and owns its params, tags, artifacts and final
status; rank 0 of the Ray Train worker group logs step and epoch metrics into the same
run through :class:`MetricLogger`. The run id also travels inside every checkpoint, so
a restarted worker group continues the same run. While the tracking server is down,
metrics wait in an on-disk outbox (:mod:`pretrainlab.tracking.outbox`).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.service_pb2 import LogBatch
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.proto_json_utils import message_to_json
from mlflow.utils.rest_utils import http_request, verify_rest_response

from pretrainlab.paths import project_home
from pretrainlab.tracking.outbox import DEFAULT_MAX_RECORDS, Outbox, outbox_path

DEFAULT_ARTIFACTS = "mlartifacts"
RUN_NAME_TAG = "pretrainlab.run_name"
CHECKPOINT_ARTIFACT = "checkpoint"
_MAX_PARAM_LENGTH = 6000
_LOG_BATCH_ENDPOINT = "/api/2.0/mlflow/runs/log-batch"
_AUTH_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"  # /health answers without credentials


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names its URI."""


def check_tracking(uri: str, timeout_s: float = 10.0) -> None:
    """Fail early, naming ``uri``, when the tracking server does not answer its health check,
    or answers an API call with 401 (a server with authentication, and no or wrong credentials)."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
                response.read()
            creds = get_default_host_creds(uri)  # MLFLOW_TRACKING_USERNAME / _PASSWORD, as every request
            status = http_request(creds, _AUTH_PROBE, "GET", max_retries=0, timeout=timeout_s).status_code
        except (urllib.error.URLError, OSError, MlflowException) as err:  # http_request raises MlflowException
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri} ({reason}); start it "
                "(mlflow server --host 127.0.0.1 --port 5000) or unset MLFLOW_TRACKING_URI"
            ) from None
        if status == 401:
            given = "refused the credentials in" if creds.username else "needs credentials: set"
            raise TrackingError(
                f"the MLflow tracking server at {uri} {given} MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (HTTP 401)"
            )
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


@contextmanager
def closing_run(client: MlflowClient, run_id: str) -> Iterator[None]:
    """Close run ``run_id`` FINISHED when the block ends, or FAILED when it raises: no run is left RUNNING."""
    try:
        yield
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


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
    """Logs metric dicts to one run at a given step (used by rank 0 of the worker group).

    Training never waits long on MLflow: requests to a tracking server use ``timeout_s``
    and ``max_retries`` (instead of MLflow's defaults, 120 s and 7 retries with backoff).
    When the server is unreachable or answers 429/5xx, metrics are appended to the run's
    on-disk :class:`~pretrainlab.tracking.outbox.Outbox`; later ``log`` calls send the
    queue, in order, before anything new. Tries to send it are spaced ``retry_every_s``
    apart, doubling after each failed try up to ``max_retry_every_s``. Other errors (a
    deleted run, an invalid metric) still raise.

    Args:
        client: The MLflow client.
        run_id: The run to log into.
        outbox_dir: Folder of outbox files (default: :func:`~pretrainlab.tracking.outbox.outbox_folder`).
        retry_every_s: Time between the first tries to send queued metrics.
        max_retry_every_s: Longest time between two tries.
        timeout_s: Seconds one HTTP request may take.
        max_retries: Retries of one HTTP request (connection errors, 429 and 5xx answers).
        max_queued: Most ``log`` calls the outbox holds; later ones are dropped and the log says so.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        *,
        outbox_dir: str | os.PathLike | None = None,
        retry_every_s: float = 15.0,
        max_retry_every_s: float = 120.0,
        timeout_s: int = 5,
        max_retries: int = 0,
        max_queued: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.outbox = Outbox(outbox_path(run_id, outbox_dir), max_queued)
        self.retry_every_s = retry_every_s
        self.max_retry_every_s = max_retry_every_s
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._interval = retry_every_s
        self._next_try = 0.0
        self._down = False
        self._refused: str | None = None

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log every metric in ``metrics`` at ``step``, or queue them while MLflow is unreachable."""
        now = int(time.time() * 1000)
        values = {key: float(value) for key, value in metrics.items()}
        if not self.outbox:
            try:
                self.send([Metric(key, value, now, step) for key, value in values.items()])
                return
            except Exception as err:
                if not is_unreachable(err):
                    raise
                self._went_away(err)
        try:
            if not self.outbox.append(step, now, values):
                self._warn_dropped(step)
        except OSError as err:  # a full or read-only disk on top of the outage: say so, keep training
            print(f"cannot queue the metrics of step {step} in {self.outbox.path}, they are lost: {err}", flush=True)
        if time.monotonic() >= self._next_try:
            try:
                self.flush()
            except Exception as err:
                if is_unreachable(err):
                    self._went_away(err)
                    return
                self._next_try = time.monotonic() + self.max_retry_every_s
                if str(err) != self._refused:
                    self._refused = str(err)
                    print(f"cannot send the queued metrics in {self.outbox.path} (they stay queued): {err}", flush=True)

    def flush(self) -> int:
        """Send the queued metrics now; the number sent.

        Raises:
            OutboxError: The outbox file holds a line that is not a record.
            MlflowException: MLflow refused a batch or is still unreachable.
        """
        queued = len(self.outbox)
        sent = self.outbox.flush(self.send)
        if sent or queued:
            dropped = f"; {self.outbox.dropped} log calls were dropped while it was full" if self.outbox.dropped else ""
            print(
                f"MLflow at {self.client.tracking_uri} answers again: flushed {sent} queued metrics "
                f"from {self.outbox.path}{dropped}",
                flush=True,
            )
            self.outbox.dropped = 0
        self._down = False
        self._refused = None
        self._interval = self.retry_every_s
        return sent

    def send(self, metrics: list[Metric]) -> None:
        """One ``log_batch`` call; to a tracking server, with this logger's timeout and retries."""
        uri = self.client.tracking_uri
        if not uri.startswith(("http://", "https://")):
            self.client.log_batch(self.run_id, metrics=metrics)
            return
        body = json.loads(message_to_json(LogBatch(run_id=self.run_id, metrics=[m.to_proto() for m in metrics])))
        response = http_request(
            get_default_host_creds(uri),
            _LOG_BATCH_ENDPOINT,
            "POST",
            max_retries=self.max_retries,
            backoff_factor=1,
            backoff_jitter=0.0,
            timeout=self.timeout_s,
            json=body,
        )
        verify_rest_response(response, _LOG_BATCH_ENDPOINT)

    def _warn_dropped(self, step: int) -> None:
        dropped = self.outbox.dropped
        if dropped in (1, 10, 100) or dropped % 1000 == 0:
            print(
                f"outbox {self.outbox.path} is full ({self.outbox.max_records} records): dropped the metrics "
                f"of {dropped} log calls so far (latest: step {step}); they are lost",
                flush=True,
            )

    def _went_away(self, err: BaseException) -> None:
        """Schedule the next try (backing off) and say once that MLflow is gone."""
        if self._down:
            self._interval = min(max(self._interval * 2, self.retry_every_s), self.max_retry_every_s)
        self._next_try = time.monotonic() + self._interval
        if not self._down:
            self._down = True
            print(
                f"MLflow at {self.client.tracking_uri} unreachable ({_reason(err)}): queueing metrics in "
                f"{self.outbox.path}; they are sent when it answers, or replay them with "
                f"`python -m pretrainlab.tracking.outbox replay {self.outbox.path}`",
                flush=True,
            )


def is_unreachable(err: BaseException) -> bool:
    """True for errors that mean "try again later": no connection, a timeout, a 429 or 5xx answer."""
    if isinstance(err, MlflowException):
        status = err.get_http_status_code()
        return status == 429 or status >= 500
    return isinstance(err, requests.exceptions.RequestException | OSError)


def _reason(err: BaseException) -> str:
    """The innermost cause of ``err`` in one short line (e.g. ``[Errno 111] Connection refused``)."""
    innermost = err
    while (innermost.__cause__ or innermost.__context__) is not None:
        innermost = innermost.__cause__ or innermost.__context__
    text = (str(innermost) or type(innermost).__name__).splitlines()[0]
    return text if len(text) <= 160 else text[:160] + "..."


def register_checkpoint(
    client: MlflowClient, run_id: str, model_name: str, artifact_path: str = CHECKPOINT_ARTIFACT
) -> ModelVersion:
    """Register ``runs:/RUN/artifact_path`` as a new version of ``model_name`` (created if needed)."""
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="Registered by PretrainLab.")
    return client.create_model_version(model_name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id)

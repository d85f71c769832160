"""What the evaluation jobs share: their common arguments and errors, and their MLflow child runs.

A job (``jobs/evaluate.py``, ``jobs/knn_eval.py``, ``jobs/linear_probe.py``, ``jobs/zero_shot.py``) parses its arguments
with :func:`job_parser`, checks the tracking store with :func:`checked_tracking_uri` before any
work, reports a bad input (one of ``JOB_ERRORS``) with :func:`report_error` (``error: ...`` on
stderr, exit code 2), and logs its metrics with :func:`log_child_run`: a run of its own, nested
under the training run that made the checkpoint (when that run is known).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from pretrainlab.checkpoint import CheckpointError
from pretrainlab.data.errors import DatasetError
from pretrainlab.paths import resolve_tracking_uri
from pretrainlab.tracking.mlflow import (
    MetricLogger,
    TrackingError,
    check_tracking,
    client_for,
    closing_run,
    ensure_experiment,
)
from pretrainlab.tracking.registry import EVALUATION_TAG

SOURCE_HELP = "checkpoint folder, models:/NAME@alias, models:/NAME/VERSION or runs:/ID/path"
MLFLOW_BATCH = 1000
"""Most metrics MLflow takes in one log_batch call."""


class ArgumentError(ValueError):
    """An argument value out of range; the message names it."""


JOB_ERRORS = (ArgumentError, TrackingError, CheckpointError, DatasetError)
"""Errors an evaluation job reports as ``error: ...`` with exit code 2 (bad input, not a bug)."""


def job_parser(doc: str, batch_size: int) -> argparse.ArgumentParser:
    """A parser with the arguments every evaluation job takes.

    Args:
        doc: The job's docstring; its first paragraph describes the job.
        batch_size: Default of ``--batch-size``, images per forward pass.

    Returns:
        The parser with ``source``, ``--batch-size`` and ``--no-mlflow``; the job adds its own.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("source", help=SOURCE_HELP)
    common = parser.add_argument_group("options of every evaluation job")  # listed after the job's own
    common.add_argument("--batch-size", type=int, default=batch_size, help="images per forward pass")
    common.add_argument("--no-mlflow", action="store_true", help="print the metrics only")
    return parser


def check_counts(args: argparse.Namespace, *names: str) -> None:
    """Check that each integer argument in ``names`` (attribute names, e.g. ``batch_size``) is at least 1.

    Raises:
        ArgumentError: naming the first one that is not.
    """
    for name in names:
        if getattr(args, name) < 1:
            raise ArgumentError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def checked_tracking_uri(source: str, no_mlflow: bool) -> str:
    """The tracking URI, its store checked first where the job uses it: to log, or to fetch a
    ``models:/`` or ``runs:/`` source.

    Raises:
        TrackingError: the store is needed and does not answer.
    """
    tracking_uri = resolve_tracking_uri()
    if not no_mlflow or source.startswith(("models:/", "runs:/")):
        check_tracking(tracking_uri)
    return tracking_uri


def report_error(err: Exception) -> int:
    """Print ``error: <err>`` to stderr; returns the job's exit code for bad input, 2."""
    print(f"error: {err}", file=sys.stderr)
    return 2


def start_child_run(
    client: MlflowClient, meta: dict[str, Any], source: str, split: str, protocol: str, params: Mapping[str, Any]
) -> str:
    """Open a run for one evaluation protocol of a checkpoint.

    The run is nested under the checkpoint's training run when known, in the experiment of the
    checkpoint's config, tagged with ``source``, ``split`` and ``protocol``, with ``params`` logged.

    Returns:
        The run's id.
    """
    experiment_id = ensure_experiment(client, meta["config"]["runtime"]["experiment"])
    tags = {EVALUATION_TAG: source, "pretrainlab.split": split, "pretrainlab.protocol": protocol}
    if meta.get("mlflow_run_id"):
        tags["mlflow.parentRunId"] = meta["mlflow_run_id"]
    run_name = f"{protocol}-{split}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
    return run_id


def log_curves(client: MlflowClient, run_id: str, curves: Mapping[str, Sequence[float]]) -> None:
    """Log each curve in ``curves`` to run ``run_id``, its i-th value at step i + 1 (epochs count from 1)."""
    now = int(time.time() * 1000)
    entries = [
        Metric(key, float(value), now, step)
        for key, values in curves.items()
        for step, value in enumerate(values, start=1)
    ]
    for start in range(0, len(entries), MLFLOW_BATCH):
        client.log_batch(run_id, metrics=entries[start : start + MLFLOW_BATCH])


def log_child_run(
    tracking_uri: str,
    meta: dict[str, Any],
    source: str,
    split: str,
    protocol: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    curves: Mapping[str, Sequence[float]] | None = None,
) -> str:
    """Log one evaluation of a checkpoint as a child run (see :func:`start_child_run`), closed FINISHED,
    or FAILED when logging raises.

    Args:
        tracking_uri: The tracking store.
        meta: The checkpoint's meta (its config and training run id).
        source: The checkpoint as the job was given it.
        split: The split the metrics are of.
        protocol: The evaluation protocol, e.g. ``knn``; also the run name's prefix.
        params: The protocol's parameters.
        metrics: Final metrics, logged at step 0.
        curves: Per-epoch metrics, logged at steps 1, 2, ...

    Returns:
        The run's id.
    """
    client = client_for(tracking_uri)
    run_id = start_child_run(client, meta, source, split, protocol, params)
    with closing_run(client, run_id):
        MetricLogger(client, run_id).log(metrics, 0)
        log_curves(client, run_id, curves or {})
    return run_id

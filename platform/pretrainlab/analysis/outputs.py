"""How the analysis tools take arguments, report errors and put what they make: a file, and an MLflow run."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from mlflow.exceptions import MlflowException

from pretrainlab.checkpoint import CheckpointError
from pretrainlab.data.errors import DatasetError
from pretrainlab.data.transforms import PipelineError
from pretrainlab.models.backbones import BackboneError
from pretrainlab.paths import resolve_tracking_uri
from pretrainlab.tracking.mlflow import TrackingError, client_for


def add_output_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """``--out FILE``, ``--mlflow-run ID`` (default: ``$MLFLOW_RUN_ID``) and ``--tracking-uri URI``."""
    parser.add_argument("--out", default=default_out, help=f"file to write (default: {default_out})")
    parser.add_argument(
        "--mlflow-run", default=os.environ.get("MLFLOW_RUN_ID"), help="also log the file to this MLflow run"
    )
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project's)")


def write_csv(rows: Iterable[dict], columns: Sequence[str], out: str | os.PathLike) -> None:
    """Rows (mappings keyed by ``columns``) as a CSV file with a header, its folder created."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def publish(path: str | os.PathLike, args: argparse.Namespace, artifact_dir: str) -> None:
    """Say where ``path`` was written and, with ``--mlflow-run``, log it under ``artifact_dir``."""
    print(f"wrote {path}")
    if args.mlflow_run:
        client_for(resolve_tracking_uri(args.tracking_uri)).log_artifact(args.mlflow_run, str(Path(path)), artifact_dir)
        print(f"logged to MLflow run {args.mlflow_run} under {artifact_dir}/")


class AnalysisError(ValueError):
    """A bad argument or a model the tool cannot analyse; the message names it."""


ERRORS = (CheckpointError, DatasetError, PipelineError, TrackingError, BackboneError, AnalysisError)


def report_error(err: Exception) -> int:
    """Print ``error: ...`` on stderr; the exit code of a bad input."""
    message = err.message if isinstance(err, MlflowException) else str(err)
    print(f"error: {message}", file=sys.stderr)
    return 2


def check_mlflow_run(args: argparse.Namespace) -> None:
    """Fail before any work when ``--mlflow-run`` names a run the store does not have."""
    if args.mlflow_run:
        uri = resolve_tracking_uri(args.tracking_uri)
        try:
            client_for(uri).get_run(args.mlflow_run)
        except MlflowException as err:
            raise AnalysisError(
                f"--mlflow-run {args.mlflow_run}: not a run of the MLflow store at {uri} ({err.message})"
            ) from None

"""Where the analysis tools put what they make: a file, and an MLflow run when one is named."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pretrainlab.tracking.mlflow import client_for, resolve_tracking_uri


def add_output_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """``--out FILE``, ``--mlflow-run ID`` (default: ``$MLFLOW_RUN_ID``) and ``--tracking-uri URI``."""
    parser.add_argument("--out", default=default_out, help=f"file to write (default: {default_out})")
    parser.add_argument(
        "--mlflow-run", default=os.environ.get("MLFLOW_RUN_ID"), help="also log the file to this MLflow run"
    )
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project's)")


def publish(path: str | os.PathLike, args: argparse.Namespace, artifact_dir: str) -> None:
    """Say where ``path`` was written and, with ``--mlflow-run``, log it under ``artifact_dir``."""
    print(f"wrote {path}")
    if args.mlflow_run:
        client_for(resolve_tracking_uri(args.tracking_uri)).log_artifact(args.mlflow_run, str(Path(path)), artifact_dir)
        print(f"logged to MLflow run {args.mlflow_run} under {artifact_dir}/")

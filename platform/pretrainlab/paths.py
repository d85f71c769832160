"""Where PretrainLab keeps data, runs and the default MLflow store.

Relative paths in a config are resolved against ``PRETRAINLAB_HOME`` (default: the
current directory). Jobs submitted with ``ray job submit --working-dir .`` run in a copy
of the project, so the README passes the real project folder in ``PRETRAINLAB_HOME``.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "PRETRAINLAB_HOME"
DEFAULT_STORE = "mlflow.db"
"""The MLflow store of a project without ``MLFLOW_TRACKING_URI``: a sqlite file in the project folder."""
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
"""Prefixes of a checkpoint held by MLflow (a registered model version or a run's artifacts), not a path."""


def project_home() -> Path:
    """The folder that relative data, run and tracking paths are resolved against."""
    return Path(os.environ.get(HOME_ENV) or os.getcwd()).resolve()


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` locations such as ``s3://bucket/x``."""
    return "://" in path


def resolve(path: str | os.PathLike) -> str:
    """An absolute path (or an untouched URI) for ``path``, relative to :func:`project_home`."""
    text = os.fspath(path)
    if is_uri(text):
        return text
    return str((project_home() / Path(text).expanduser()).resolve())


def resolve_tracking_uri(configured: str | None = None) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file in the project folder."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_home() / DEFAULT_STORE}"

"""Load a trained model from a checkpoint folder or an MLflow URI, without unpickling."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import torch
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.paths import MLFLOW_SCHEMES, project_home
from pretrainlab.strategies import get_strategy
from pretrainlab.tracking.mlflow import client_for, resolve_tracking_uri
from pretrainlab.train.checkpoint import META_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint, verify_checkpoint

CHECKPOINT_CACHE = ".cache/checkpoints"
"""Checkpoints fetched from MLflow, under ``PRETRAINLAB_HOME``; safe to delete."""


@dataclass
class LoadedModel:
    """A model in eval mode with the metadata of the checkpoint it came from."""

    model: nn.Module
    config: ExperimentConfig
    meta: dict[str, Any]
    checkpoint_dir: Path

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])


def fetch_checkpoint(source: str | os.PathLike, tracking_uri: str | None = None) -> Path:
    """A local checkpoint folder for ``source``.

    ``source`` is a folder, ``models:/NAME@alias``, ``models:/NAME/3`` or ``runs:/ID/path``. From MLflow only
    what a model loads from is downloaded (``config.json`` and the weights, not the training state), once:
    into ``PRETRAINLAB_HOME/.cache/checkpoints``, under the sha256 of its ``config.json``.
    """
    text = os.fspath(source)
    if not text.startswith(MLFLOW_SCHEMES):
        path = Path(text)
        if not path.is_dir():
            raise CheckpointError(f"{text}: no such checkpoint folder (or use a models:/ or runs:/ URI)")
        return path
    uri = resolve_tracking_uri(tracking_uri)
    try:
        if text.startswith("models:/"):  # resolved in the store at ``uri``, not in the default registry
            client = client_for(uri)
            name, version = get_model_name_and_version(client, text)
            text = client.get_model_version_download_uri(name, version)
        return _cached_checkpoint(text, uri)
    except MlflowException as err:
        raise CheckpointError(f"{text}: cannot be fetched from the MLflow store at {uri}: {err.message}") from None


def _cached_checkpoint(artifact_uri: str, tracking_uri: str) -> Path:
    """The checkpoint logged at ``artifact_uri``, in the local cache (downloaded unless it is there already)."""
    cache = project_home() / CHECKPOINT_CACHE
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".partial-", ignore_cleanup_errors=True) as staging:
        meta = Path(_download(artifact_uri, META_FILE, staging, tracking_uri))
        folder = cache / hashlib.sha256(meta.read_bytes()).hexdigest()[:20]
        if not folder.is_dir():
            _download(artifact_uri, WEIGHTS_FILE, staging, tracking_uri)
            verify_checkpoint(staging)
            with contextlib.suppress(OSError):  # another process has just put the same checkpoint there
                Path(staging).rename(folder)
    return folder


def _download(artifact_uri: str, name: str, folder: str, tracking_uri: str) -> str:
    """The local path of the file ``name`` under ``artifact_uri``, downloaded into ``folder``."""
    return mlflow.artifacts.download_artifacts(
        f"{artifact_uri.rstrip('/')}/{name}", dst_path=folder, tracking_uri=tracking_uri
    )


def load_model(
    source: str | os.PathLike, device: str | torch.device = "cpu", tracking_uri: str | None = None
) -> LoadedModel:
    """Build the checkpoint's model from its saved config and load its verified weights."""
    folder = fetch_checkpoint(source, tracking_uri)
    ckpt = load_checkpoint(folder)
    cfg = ExperimentConfig.model_validate(ckpt.meta["config"])
    strategy = get_strategy(cfg.strategy)
    model = strategy.build_model(cfg, ckpt.meta["num_classes"], ckpt.meta["in_chans"], load_init_from=False)
    missing, unexpected = model.load_state_dict(ckpt.weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return LoadedModel(model.to(device).eval(), cfg, ckpt.meta, folder)

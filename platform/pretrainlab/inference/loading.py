"""Load a trained model from a checkpoint folder or an MLflow URI, without unpickling."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import torch
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version
from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.strategies import get_strategy
from pretrainlab.tracking.mlflow import client_for, resolve_tracking_uri
from pretrainlab.train.checkpoint import CheckpointError, load_checkpoint

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


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

    ``source`` is a folder, ``models:/NAME@alias``, ``models:/NAME/3`` or ``runs:/ID/path``.
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
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=text, tracking_uri=uri))
    except MlflowException as err:
        raise CheckpointError(f"{text}: cannot be fetched from the MLflow store at {uri}: {err.message}") from None


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

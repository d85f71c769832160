"""PretrainLab checkpoints: safe to load, written atomically, verified on read, fetched from MLflow.

A checkpoint is a folder holding

- ``model.safetensors``: the model weights (no pickle);
- ``config.json``: the resolved experiment config, class names, metrics, epoch, step,
  the MLflow run id and the sha256 of the weights;
- ``training_state.pt`` (optional): optimizer, scheduler and RNG state, loaded with
  ``torch.load(weights_only=True)`` so that nothing is unpickled.

The folder is written under a temporary name and renamed into place, so a crash never
leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.artifacts
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pretrainlab.config import ExperimentConfig
from pretrainlab.paths import MLFLOW_SCHEMES, project_home, resolve_tracking_uri

WEIGHTS_FILE = "model.safetensors"
META_FILE = "config.json"
STATE_FILE = "training_state.pt"
FORMAT_VERSION = 1
CHECKPOINT_CACHE = ".cache/checkpoints"
"""Checkpoints fetched from MLflow, under ``PRETRAINLAB_HOME``; safe to delete."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns."""

    path: Path
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any]
    training_state: dict[str, Any] | None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_meta(
    cfg: ExperimentConfig,
    dataset: dict[str, Any],
    epoch: int,
    step: int,
    metrics: dict[str, float],
    mlflow_run_id: str | None,
) -> dict[str, Any]:
    """The metadata every PretrainLab checkpoint carries: config, classes, position, metrics, MLflow run."""
    return {
        "config": cfg.to_dict(),
        "strategy": cfg.strategy,
        "class_names": dataset["class_names"],
        "num_classes": dataset["num_classes"],
        "in_chans": dataset["in_chans"],
        "dataset_task": dataset.get("task", "classification"),
        "epoch": epoch,
        "step": step,
        "metrics": metrics,
        "mlflow_run_id": mlflow_run_id,
    }


def save_checkpoint(
    directory: str | os.PathLike,
    weights: dict[str, torch.Tensor],
    meta: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically and return its path.

    Args:
        directory: The final folder; replaced if it exists.
        weights: Model state dict (tensors only).
        meta: JSON-serialisable metadata (config, class names, metrics, epoch, step, ...).
        training_state: Optimizer/scheduler/RNG state, tensors and plain containers only.
    """
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)
        full_meta = {**meta, "format_version": FORMAT_VERSION, "weights_sha256": _sha256(tmp / WEIGHTS_FILE)}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {Path(directory)} is not a PretrainLab checkpoint")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def verify_checkpoint(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder whose weights match their recorded sha256 (nothing is loaded).

    Raises:
        CheckpointError: A file is missing, or the weights do not match their recorded sha256.
    """
    meta = read_meta(directory)
    weights_path = Path(directory) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing")
    if _sha256(weights_path) != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights_path}: sha256 does not match config.json; the checkpoint is corrupted")
    return meta


def load_checkpoint(directory: str | os.PathLike, with_training_state: bool = False) -> LoadedCheckpoint:
    """Load and verify a checkpoint folder.

    Raises:
        CheckpointError: A file is missing, or the weights do not match their recorded sha256.
    """
    path = Path(directory)
    meta = verify_checkpoint(path)
    weights_path = path / WEIGHTS_FILE
    try:
        weights = load_file(str(weights_path))
    except SafetensorError as err:
        raise CheckpointError(f"{weights_path}: unreadable ({err})") from None
    state = None
    if with_training_state:
        state_path = path / STATE_FILE
        if not state_path.is_file():
            raise CheckpointError(f"{state_path}: missing; cannot resume training from this checkpoint")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for corrupt or unsafe files
            raise CheckpointError(f"{state_path}: unreadable ({err})") from None
    return LoadedCheckpoint(path=path, weights=weights, meta=meta, training_state=state)


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
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
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

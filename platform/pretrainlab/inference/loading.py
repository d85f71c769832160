"""Load a trained model from a checkpoint folder or an MLflow URI, without unpickling."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrainlab.checkpoint import CheckpointError, fetch_checkpoint, load_checkpoint
from pretrainlab.config import ExperimentConfig
from pretrainlab.strategies import get_strategy


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

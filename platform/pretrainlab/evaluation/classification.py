"""Classification evaluation: the logits of a checkpoint on a split, with their top-1 / top-5 / loss."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pretrainlab.config import DataConfig
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.dataset import load_split_numpy
from pretrainlab.data.transforms import eval_pipeline, normalize
from pretrainlab.inference.loading import LoadedModel, load_model
from pretrainlab.metrics.classification import evaluate_logits


def eval_batches(
    images: np.ndarray, cfg: DataConfig, batch_size: int = 512, device: torch.device | str = "cpu"
) -> Iterator[torch.Tensor]:
    """uint8 ``N x C x H x W`` images in batches, through the evaluation pipeline, normalised, on ``device``."""
    pipeline = eval_pipeline(cfg)
    for start in range(0, len(images), batch_size):
        yield normalize(pipeline(torch.from_numpy(images[start : start + batch_size])), cfg).to(device)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: np.ndarray,
    cfg: DataConfig,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits of ``model`` for uint8 ``N x C x H x W`` images through the evaluation pipeline, in one process."""
    model.eval()
    return torch.cat(
        [model({"image": batch})["logits"].float().cpu() for batch in eval_batches(images, cfg, batch_size, device)]
    )


@dataclass
class Evaluation:
    """Metrics of a checkpoint on one split, with the labels and predictions behind them."""

    split: str
    metrics: dict[str, float]
    labels: np.ndarray
    preds: np.ndarray
    class_names: list[str]
    meta: dict[str, Any]


def evaluate_checkpoint(
    source: str | os.PathLike | LoadedModel,
    split: str = "test",
    data_folder: str | None = None,
    batch_size: int = 512,
) -> Evaluation:
    """Top-1/top-5/loss of a checkpoint (folder or MLflow URI) on a split of its dataset, in one process.

    Args:
        source: Checkpoint folder, ``models:/...`` or ``runs:/...``, or a model loaded from one.
        split: Which split of the dataset to evaluate.
        data_folder: Prepared dataset folder; default: the dataset named in the checkpoint's config.
        batch_size: Images per forward pass.
    """
    loaded = source if isinstance(source, LoadedModel) else load_model(source)
    folder = data_folder or dataset_dir(loaded.config)
    images, labels = load_split_numpy(folder, split)
    logits = predict(loaded.model, images, loaded.config.data, batch_size)
    return Evaluation(
        split=split,
        metrics=evaluate_logits(logits, labels),
        labels=labels,
        preds=logits.argmax(1).numpy(),
        class_names=loaded.class_names,
        meta=loaded.meta,
    )

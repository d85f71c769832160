"""Classification metrics, accumulated as sums so that workers can add theirs together."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrainlab.config import DataConfig
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.dataset import load_split_numpy
from pretrainlab.data.transforms import eval_pipeline, normalize
from pretrainlab.inference.loading import LoadedModel, load_model


def classification_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[summed loss, top-1 hits, top-5 hits, count]`` for one batch, as float64."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hits = topk == labels[:, None]
    return torch.tensor(
        [
            F.cross_entropy(logits.float(), labels, reduction="sum").item(),
            hits[:, 0].sum().item(),
            hits.any(dim=1).sum().item(),
            labels.numel(),
        ],
        dtype=torch.float64,
    )


def all_reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    """Add the sums of every worker (a no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        total = sums.to(device)
        dist.all_reduce(total)
        return total.cpu()
    return sums


def gather_from_workers(value: Any) -> list[Any]:
    """Every worker's ``value`` (any picklable object), in rank order (``[value]`` outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every worker's rows of ``tensor`` (any count per worker), concatenated in rank order (itself outside a
    process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return torch.cat(gather_from_workers(tensor.cpu()))


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Mean loss and top-1 / top-5 accuracy in percent."""
    loss, top1, top5, count = sums.tolist()
    if count == 0:
        raise ValueError("no samples were evaluated")
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}


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


def evaluate_logits(logits: torch.Tensor, labels: Iterable[int] | torch.Tensor) -> dict[str, float]:
    """Loss, top-1 and top-5 of precomputed logits."""
    return metrics_from_sums(classification_sums(logits, torch.as_tensor(labels, dtype=torch.long)))


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

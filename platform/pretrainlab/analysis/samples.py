"""A checkpoint's model and a sample of its dataset split, preprocessed as evaluation does."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pretrainlab.analysis.outputs import AnalysisError
from pretrainlab.config import DataConfig
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.dataset import load_split_numpy
from pretrainlab.data.transforms import eval_pipeline, normalize
from pretrainlab.evaluation.figures import stratified_indices
from pretrainlab.inference.loading import LoadedModel, load_model


def eval_images(images: np.ndarray, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images through the evaluation pipeline: ``(as seen, uint8; normalised model input)``."""
    seen = eval_pipeline(data)(torch.from_numpy(images))
    return seen, normalize(seen, data)


def load_subset(source: str, split: str, num: int, seed: int, tracking_uri: str | None = None):
    """The model of ``source`` and a stratified sample of ``split``: ``(loaded, images, labels, row indices)``."""
    loaded = load_model(source, tracking_uri=tracking_uri)
    images, labels = load_split_numpy(dataset_dir(loaded.config), split)
    chosen = stratified_indices(labels, num, seed)
    return loaded, images[chosen], labels[chosen], chosen


def backbone_of(loaded: LoadedModel) -> nn.Module:
    backbone = getattr(loaded.model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise AnalysisError(f"{type(loaded.model).__name__} has no backbone module to take features from")
    return backbone


@torch.no_grad()
def features(loaded: LoadedModel, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Pooled backbone features (the classification head's input) of uint8 images, ``N x num_features``."""
    backbone = backbone_of(loaded).eval()
    out = []
    for start in range(0, len(images), batch_size):
        _, batch = eval_images(images[start : start + batch_size], loaded.config.data)
        out.append(backbone(batch).float().flatten(1).cpu())
    return torch.cat(out).numpy()

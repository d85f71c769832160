"""From shard rows to model inputs: decode, augment, mask (the ``Preprocessor``), then tensors on the device.

The ``Preprocessor`` runs either inside the training worker (``data.augment_on: worker``,
nothing else competes for a small machine's cores) or in Ray Data ``map_batches`` tasks
(``data.augment_on: ray_data``, which overlaps with training and scales out to other
nodes' CPUs). Either way the same code turns a batch of rows into uint8 arrays.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import ray.data
import torch
from timm.data import Mixup

from pretrainlab.config import DataConfig, ExperimentConfig
from pretrainlab.data.dataset import decode_images
from pretrainlab.data.masks import make_masks
from pretrainlab.data.text import text_columns
from pretrainlab.data.transforms import eval_pipeline, normalize, train_views

UNLABELLED = -1


def view_key(index: int) -> str:
    """The batch column of the ``index``-th view of a multi-view batch."""
    return f"view{index}"


class Preprocessor:
    """Decode and augment a numpy batch of shard rows.

    Output columns: ``label`` (int64, -1 when unlabelled; classification rows only), the token
    columns of image-text rows (``text``, ``negative_text``, ``sequence``, ``target_mask``: see
    :func:`pretrainlab.data.text.text_columns`; drawn at random when ``train``, else the first
    caption / questions / objects of each row) and either ``image`` (uint8
    N x C x H x W) or, with several views, ``view0``, ``view1``, ...; plus ``mask``
    (bool N x h x w patches) when ``data.mask`` is set and ``train`` is true. With
    ``data.repeated_augmentation`` R > 1, a training batch of N rows becomes N // R of them,
    each R times in a row, each copy augmented on its own.
    """

    def __init__(self, cfg: DataConfig, train: bool, seed: int | None = None) -> None:
        self.cfg = cfg
        self.train = train
        self.views = train_views(cfg) if train else [eval_pipeline(cfg)]
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.train and self.cfg.repeated_augmentation > 1:
            batch = repeat_rows(batch, self.cfg.repeated_augmentation, self.rng)
        images = torch.from_numpy(decode_images(batch))
        out: dict[str, np.ndarray] = {}
        if "label" in batch:  # classification rows; image-text rows carry their text columns instead
            labels = batch["label"]
            if labels.dtype == object:  # nullable column with missing labels
                labels = np.array([UNLABELLED if v is None else v for v in labels])
            out["label"] = labels.astype(np.int64)
        out.update(
            text_columns(batch, self.cfg.context_length, self.rng if self.train else None, self.cfg.texts_per_image)
        )
        views = [pipeline(images).numpy() for pipeline in self.views]
        if len(views) == 1:
            out["image"] = views[0]
        else:
            out.update({view_key(i): view for i, view in enumerate(views)})
        if self.train and self.cfg.mask is not None:
            _, _, height, width = views[0].shape
            out["mask"] = make_masks(self.cfg.mask, len(images), height, width, self.rng)
        return out


def repeat_rows(batch: dict[str, np.ndarray], repeats: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``len(batch) // repeats`` rows drawn without replacement, each repeated ``repeats`` times in a row."""
    count = len(next(iter(batch.values())))
    chosen = np.sort(rng.choice(count, size=count // repeats, replace=False))
    index = np.repeat(chosen, repeats)
    return {key: column[index] for key, column in batch.items()}


def batch_blocks(ds: ray.data.Dataset, cfg: ExperimentConfig) -> ray.data.Dataset:
    """``ds`` cut (streaming, no shuffle) into blocks of one training batch each.

    Cut once, before ``materialize``, so that even a single large shard is augmented by
    several ``map_batches`` tasks in parallel every epoch.
    """
    return ds.repartition(target_num_rows_per_block=cfg.train.batch_size)


def augment_in_ray_data(ds: ray.data.Dataset, cfg: ExperimentConfig) -> ray.data.Dataset:
    """``ds`` decoded and augmented by ``map_batches`` tasks (``data.augment_on: ray_data``).

    Ray Data's per-operator resource reservation is turned off for this dataset: with one
    map operator it would hold back half of a small node's CPUs.
    """
    augmented = ds.map_batches(
        Preprocessor(cfg.data, train=True),
        batch_format="numpy",
        batch_size=cfg.train.batch_size,
        num_cpus=cfg.data.ray_data_cpus,
    )
    augmented.context.op_resource_reservation_enabled = False
    return augmented


def training_batches(
    shard: Any, cfg: ExperimentConfig, epoch: int, device: torch.device | None = None
) -> Iterator[dict[str, np.ndarray | torch.Tensor]]:
    """One epoch of a worker's training shard: full batches, shuffled in a local buffer.

    The shuffle is seeded from ``runtime.seed`` and the epoch, so every epoch sees a new
    order and a rerun with the same seed sees the same ones. Batches that Ray Data already
    decoded and augmented (``data.augment_on: ray_data``) bound for a GPU come as tensors on
    ``device``: Ray's prefetch thread copies them into page-locked memory and on to the GPU while
    the last batch trains. Otherwise they are NumPy arrays.
    """
    options: dict[str, Any] = {"batch_size": cfg.train.batch_size, "drop_last": True}
    if cfg.data.shuffle_buffer_rows:
        seed = cfg.runtime.seed * 100_003 + epoch
        options |= {"local_shuffle_buffer_size": cfg.data.shuffle_buffer_rows, "local_shuffle_seed": seed}
    if device is not None and device.type == "cuda" and cfg.data.augment_on == "ray_data":
        return shard.iter_torch_batches(device=device, pin_memory=True, **options)
    return shard.iter_batches(batch_format="numpy", **options)


def to_model_inputs(
    batch: dict[str, np.ndarray | torch.Tensor], cfg: DataConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """Tensors on ``device``: images and views normalised to float, labels int64, masks bool."""
    inputs = {}
    for key, value in batch.items():
        tensor = torch.as_tensor(value).to(device, non_blocking=True)
        inputs[key] = normalize(tensor, cfg) if tensor.dtype == torch.uint8 and tensor.ndim == 4 else tensor
    return inputs


def build_mixup(cfg: DataConfig, num_classes: int, label_smoothing: float) -> Mixup | None:
    """timm's ``Mixup`` (mixup / cutmix, label smoothing folded into the soft targets), or None when off."""
    if cfg.mixup is None:
        return None
    m = cfg.mixup
    return Mixup(
        mixup_alpha=m.mixup_alpha,
        cutmix_alpha=m.cutmix_alpha,
        prob=m.prob,
        switch_prob=m.switch_prob,
        mode=m.mode,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )

"""Batch transforms that run on the training worker, on uint8 ``N x C x H x W`` tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrainlab.config import DataConfig


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero-pad each image by ``padding`` pixels and crop it back at an independent random offset."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    rows = (offsets[0][:, None] + torch.arange(h))[:, None, :, None]
    cols = (offsets[1][:, None] + torch.arange(w))[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    channels = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, channels, rows, cols]


def random_horizontal_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image left-right with probability 0.5."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class BatchTransform:
    """uint8 images -> normalised float images, with the training augmentations when ``train``.

    Training and evaluation (and serving) share this class, so they cannot drift apart.
    """

    def __init__(self, cfg: DataConfig, train: bool) -> None:
        self.cfg = cfg
        self.train = train
        self.mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.std).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 N x C x H x W images, got {images.dtype} {tuple(images.shape)}")
        x = images.float().div_(255)
        size = self.cfg.image_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if self.train:
            aug = self.cfg.augment
            if aug.random_crop_padding:
                x = random_crop(x, aug.random_crop_padding, generator)
            if aug.horizontal_flip:
                x = random_horizontal_flip(x, generator)
        if self.mean.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"data.mean has {self.mean.shape[1]} values for {x.shape[1]}-channel images")
        return (x - self.mean) / self.std

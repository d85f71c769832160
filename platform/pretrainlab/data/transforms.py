"""Image pipelines from the config: torchvision ``transforms.v2`` and timm ops, multi-view, normalisation.

A pipeline is a list of ops written like MMPreTrain's, each a mapping with a ``type`` and
its keyword arguments::

    train_pipeline:
      - {type: RandomResizedCrop, size: 64, scale: [0.2, 1.0]}
      - {type: RandomHorizontalFlip}
      - {type: TimmRandAugment, config: rand-m9-mstd0.5}
      - {type: RandomErasing, p: 0.25}

Ops work on uint8 ``C x H x W`` tensors and every image gets its own random parameters;
every op in a pipeline must leave all images of a batch the same size. The common geometric
ops run on the whole batch at once (:func:`batched`), with torchvision's own parameter
sampling and kernels, so their output is what the per-image op would give.
Normalisation (``data.mean`` / ``data.std``) comes last, on the training worker, in
:func:`normalize`. Evaluation, training and serving all build their transforms here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2 as v2
from PIL import Image
from timm.data import auto_augment

from pretrainlab.config import DataConfig


def _posterize_keeping_a_bit(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, with 0 bits taken as 1: Pillow 11+ refuses 0 (older Pillow made the image black)."""
    return auto_augment.posterize(image, max(1, bits_to_keep), **kwargs)


def _with_pillow_safe_ops(ops: Sequence[auto_augment.AugmentOp]) -> None:
    for op in ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize_keeping_a_bit


class TimmRandAugment:
    """timm's RandAugment from a config string such as ``rand-m9-mstd0.5-inc1`` (on PIL images)."""

    def __init__(self, config: str = "rand-m9-mstd0.5") -> None:
        self.op = auto_augment.rand_augment_transform(config, {})
        _with_pillow_safe_ops(self.op.ops)

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.op(image)


class TimmAutoAugment:
    """timm's AutoAugment policies (``original``, ``v0``, ``3a``...) from a config string such as ``v0``."""

    def __init__(self, config: str = "v0") -> None:
        self.op = auto_augment.auto_augment_transform(config, {})
        for sub_policy in self.op.policy:
            _with_pillow_safe_ops(sub_policy)

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.op(image)


TENSOR_OPS: dict[str, type] = {
    "Resize": v2.Resize,
    "CenterCrop": v2.CenterCrop,
    "Pad": v2.Pad,
    "RandomCrop": v2.RandomCrop,
    "RandomResizedCrop": v2.RandomResizedCrop,
    "RandomHorizontalFlip": v2.RandomHorizontalFlip,
    "RandomVerticalFlip": v2.RandomVerticalFlip,
    "RandomRotation": v2.RandomRotation,
    "RandomAffine": v2.RandomAffine,
    "ColorJitter": v2.ColorJitter,
    "RandomGrayscale": v2.RandomGrayscale,
    "GaussianBlur": v2.GaussianBlur,
    "RandomSolarize": v2.RandomSolarize,
    "RandomEqualize": v2.RandomEqualize,
    "RandomAutocontrast": v2.RandomAutocontrast,
    "RandAugment": v2.RandAugment,
    "AutoAugment": v2.AutoAugment,
    "TrivialAugmentWide": v2.TrivialAugmentWide,
    "RandomErasing": v2.RandomErasing,
}
"""Ops that take uint8 tensors (torchvision ``transforms.v2``)."""

PIL_OPS: dict[str, type] = {"TimmRandAugment": TimmRandAugment, "TimmAutoAugment": TimmAutoAugment}
"""Ops that take PIL images (timm); the pipeline converts around them."""

RANDOM_APPLY = "RandomApply"  # {type: RandomApply, p: 0.8, transforms: [...]}, as in SimCLR's colour jitter


class PipelineError(ValueError):
    """A pipeline op is unknown or its arguments are not accepted; the message names the op."""


def build_op(spec: dict[str, Any], where: str) -> Callable:
    """One op from its ``{type: ..., **kwargs}`` mapping."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise PipelineError(f"{where}: each op must be a mapping with a 'type', got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("type")
    if name == RANDOM_APPLY:
        inner = kwargs.pop("transforms", None)
        if not isinstance(inner, list) or not inner:
            raise PipelineError(f"{where}: RandomApply needs a non-empty 'transforms' list")
        ops = [build_op(op, f"{where}.transforms[{i}]") for i, op in enumerate(inner)]
        try:
            return v2.RandomApply(ops, **kwargs)
        except TypeError as err:
            raise PipelineError(f"{where}: RandomApply: {err}") from None
    cls = TENSOR_OPS.get(name) or PIL_OPS.get(name)
    if cls is None:
        valid = ", ".join([*TENSOR_OPS, *PIL_OPS, RANDOM_APPLY])
        raise PipelineError(f"{where}: unknown op {name!r}; valid ops: {valid}")
    try:
        op = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise PipelineError(f"{where}: {name}: {err}") from None
    return _OnPIL(op) if name in PIL_OPS else op


class _OnPIL:
    """Runs a PIL-image op on a uint8 ``C x H x W`` tensor (grey images pass through RGB and back)."""

    def __init__(self, op: Callable[[Image.Image], Image.Image]) -> None:
        self.op = op

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        grey = image.shape[0] == 1
        array = image.expand(3, -1, -1) if grey else image
        out = np.asarray(self.op(Image.fromarray(array.permute(1, 2, 0).numpy())))
        tensor = torch.from_numpy(out.copy()).permute(2, 0, 1)
        return tensor[:1] if grey else tensor


def batched(op: Callable) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A whole-batch form of ``op`` (uint8 N x C x H x W in and out), or None when it only runs per image.

    Deterministic ops (``Resize``, ``CenterCrop``, ``Pad``) are applied to the batch in one
    call; flips draw one Bernoulli per image; ``RandomCrop`` draws each image's parameters
    with the op's own ``make_params``, ``RandomResizedCrop`` all boxes at once
    (:func:`resized_crop_boxes`); both skip the per-call dispatch.
    """
    if isinstance(op, v2.Resize | v2.CenterCrop | v2.Pad):
        return op
    if isinstance(op, v2.RandomHorizontalFlip):
        return partial(_random_flip, p=op.p, dim=-1)
    if isinstance(op, v2.RandomVerticalFlip):
        return partial(_random_flip, p=op.p, dim=-2)
    if isinstance(op, v2.RandomResizedCrop):
        return partial(_random_resized_crop, op)
    if isinstance(op, v2.RandomCrop):
        return partial(_with_own_params, op)
    return None


def _random_flip(images: torch.Tensor, p: float, dim: int) -> torch.Tensor:
    chosen = (torch.rand(len(images)) < p).nonzero().flatten().tolist()
    out = images.clone()
    for i in chosen:  # one small copy per flipped image beats advanced indexing over the batch
        out[i] = images[i].flip(dim)
    return out


def _with_own_params(op: v2.Transform, images: torch.Tensor) -> torch.Tensor:
    return torch.stack([op.transform(image, op.make_params([image])) for image in images])


def _random_resized_crop(op: v2.RandomResizedCrop, images: torch.Tensor) -> torch.Tensor:
    boxes = resized_crop_boxes(len(images), *images.shape[-2:], op.scale, op.ratio).tolist()
    return torch.stack(
        [
            v2.functional.resized_crop(image, *box, op.size, interpolation=op.interpolation, antialias=op.antialias)
            for image, box in zip(images, boxes, strict=True)
        ]
    )


def resized_crop_boxes(
    n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float], attempts: int = 10
) -> torch.Tensor:
    """``n`` RandomResizedCrop boxes (top, left, height, width), int64 ``n x 4``.

    torchvision's sampling, drawn for all images at once: up to ``attempts`` tries of an
    area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``, the first that
    fits the image wins, else the central crop clamped to ``ratio``.
    """
    area = height * width
    target_area = area * torch.empty(n, attempts, dtype=torch.float64).uniform_(scale[0], scale[1])
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float64))
    aspect = torch.exp(torch.empty(n, attempts, dtype=torch.float64).uniform_(log_ratio[0], log_ratio[1]))
    w = torch.sqrt(target_area * aspect).round().long()
    h = torch.sqrt(target_area / aspect).round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    fallback = ~fits.any(dim=1)
    if fallback.any():
        in_ratio = width / height
        if in_ratio < min(ratio):
            fw, fh = width, round(width / min(ratio))
        elif in_ratio > max(ratio):
            fw, fh = round(height * max(ratio)), height
        else:
            fw, fh = width, height
        w[fallback], h[fallback] = fw, fh
    top = (torch.rand(n, dtype=torch.float64) * (height - h + 1)).long()
    left = (torch.rand(n, dtype=torch.float64) * (width - w + 1)).long()
    top[fallback], left[fallback] = (height - h[fallback]) // 2, (width - w[fallback]) // 2
    return torch.stack([top, left, h, w], dim=1)


class ImagePipeline:
    """A list of ops applied to every image of a uint8 ``N x C x H x W`` batch, each with its own randomness."""

    def __init__(self, specs: Sequence[dict[str, Any]], where: str = "pipeline") -> None:
        self.where = where
        self.ops = [build_op(spec, f"{where}[{i}]") for i, spec in enumerate(specs)]
        self.batch_ops = [batched(op) for op in self.ops]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 N x C x H x W images, got {images.dtype} {tuple(images.shape)}")
        current: torch.Tensor | list[torch.Tensor] = images
        for op, batch_op in zip(self.ops, self.batch_ops, strict=True):
            if batch_op is not None and isinstance(current, torch.Tensor):
                current = batch_op(current)
            else:
                current = _stack_if_same_size([op(image) for image in current])
        if isinstance(current, list):
            shapes = sorted({tuple(image.shape) for image in current})
            raise PipelineError(f"{self.where} gave images of several sizes {shapes}; end it with a fixed-size op")
        return current.contiguous()


def _stack_if_same_size(images: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    return torch.stack(images) if len({image.shape for image in images}) == 1 else images


def normalize(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 images -> float images scaled to [0, 1], then ``(x - mean) / std`` per channel."""
    mean = torch.tensor(cfg.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std, device=images.device).view(1, -1, 1, 1)
    if mean.shape[1] not in (1, images.shape[1]):
        raise ValueError(f"data.mean has {mean.shape[1]} values for {images.shape[1]}-channel images")
    return (images.float().div_(255) - mean) / std


def train_views(cfg: DataConfig) -> list[ImagePipeline]:
    """The training pipelines: one per view (``data.views``), or ``data.train_pipeline`` alone."""
    if not cfg.views:
        return [ImagePipeline(cfg.train_pipeline, "data.train_pipeline")]
    return [
        ImagePipeline(view.pipeline, f"data.views[{i}].pipeline")
        for i, view in enumerate(cfg.views)
        for _ in range(view.count)
    ]


def eval_pipeline(cfg: DataConfig) -> ImagePipeline:
    """The evaluation (and serving) pipeline: ``data.eval_pipeline``."""
    return ImagePipeline(cfg.eval_pipeline, "data.eval_pipeline")

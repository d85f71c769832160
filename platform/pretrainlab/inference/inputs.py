"""Images given to a model at inference time, turned into the batch its evaluation saw.

An input is a file path (``str`` or ``Path``), a PIL image, a uint8 numpy array
(``H x W`` or ``H x W x C``, C = 1, 3 or 4) or the bytes of an encoded image. Each becomes
the model's channel count with the rule the dataset reader uses (PIL modes L / RGB / RGBA,
``Image.convert`` when the mode differs); an image whose H x W differs from the training
images' is resized to exactly that H x W (bilinear, antialias, aspect ratio not kept);
then ``data.eval_pipeline`` and ``data.mean`` / ``data.std`` apply, as in evaluation.

Bad inputs raise ``ValueError`` naming the input's index and the problem.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pretrainlab.config import DataConfig
from pretrainlab.data.transforms import eval_pipeline, normalize

PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
"""Channel count -> the PIL mode images are converted to (as the dataset reader does)."""

ImageInput = str | os.PathLike | Image.Image | np.ndarray | bytes
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def as_list(inputs: ImageInput | Sequence[ImageInput]) -> list[Any]:
    """One input or a list / tuple of inputs, as a list."""
    return list(inputs) if isinstance(inputs, list | tuple) else [inputs]


def load_image(item: Any, channels: int, index: int = 0) -> torch.Tensor:
    """One input as uint8 ``channels x H x W`` pixels.

    Raises:
        ValueError: naming ``index``: an unsupported type, a missing or undecodable file,
            an array of another dtype or shape.
    """
    mode = PIL_MODES.get(channels)
    if mode is None:
        raise ValueError(f"the model takes {channels}-channel images; images fit 1-, 3- or 4-channel models only")
    if isinstance(item, np.ndarray):
        array = _checked_array(item, index)
        if array.shape[2] == channels:
            return torch.from_numpy(array.copy()).permute(2, 0, 1)
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    else:
        image = _open(item, index)
    try:
        converted = image if image.mode == mode else image.convert(mode)
        pixels = np.asarray(converted).reshape(image.height, image.width, channels)
    except _DECODE_ERRORS as err:
        raise ValueError(f"input {index}: cannot decode the image: {err}") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _checked_array(array: np.ndarray, index: int) -> np.ndarray:
    """``array`` as H x W x C, after checking its dtype and shape."""
    if array.dtype != np.uint8:
        raise ValueError(f"input {index}: numpy array of dtype {array.dtype}; expected uint8 H x W or H x W x C")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in PIL_MODES or 0 in array.shape:
        raise ValueError(
            f"input {index}: numpy array of shape {array.shape}; expected H x W or H x W x C with C = 1, 3 or 4"
        )
    return array


def _open(item: Any, index: int) -> Image.Image:
    """A PIL image from a path, encoded bytes or a PIL image."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str | os.PathLike):
        path = Path(item)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ValueError(f"input {index}: cannot read {path}: {err.strerror or err}") from None
    elif isinstance(item, bytes | bytearray | memoryview):
        data = bytes(item)
    else:
        raise ValueError(
            f"input {index}: unsupported type {type(item).__name__}; give a file path, a PIL image, "
            "a uint8 numpy array or the bytes of an encoded image"
        )
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except _DECODE_ERRORS as err:
        raise ValueError(f"input {index}: unreadable image: {err}") from None
    return image


class InputPreprocessor:
    """Inputs -> the normalised float batch a model evaluates (``N x C x H x W``).

    Args:
        data: The checkpoint's ``data`` config section (eval pipeline, mean, std).
        channels: The model's input channels.
        image_size: H x W of the training images; inputs of another size are resized to it.
            None: inputs go to the eval pipeline at their own size.
    """

    def __init__(self, data: DataConfig, channels: int, image_size: tuple[int, int] | None) -> None:
        self.data = data
        self.channels = channels
        self.image_size = image_size
        self.pipeline = eval_pipeline(data)

    def image(self, item: Any, index: int = 0) -> torch.Tensor:
        """One input after decoding, resizing and the eval pipeline: uint8 ``1 x C x H x W``."""
        pixels = load_image(item, self.channels, index)
        if self.image_size is not None and tuple(pixels.shape[1:]) != self.image_size:
            pixels = TF.resize(pixels, list(self.image_size), antialias=True)
        return self.pipeline(pixels[None])

    def __call__(self, items: Sequence[Any], start: int = 0) -> torch.Tensor:
        """The normalised batch of ``items``; ``start`` is the index of the first one in error messages."""
        images = [self.image(item, start + i) for i, item in enumerate(items)]
        sizes = {tuple(image.shape[2:]) for image in images}
        if len(sizes) > 1:
            raise ValueError(
                f"inputs {start}..{start + len(items) - 1} have several sizes after data.eval_pipeline "
                f"({sorted(sizes)}) and the training image size is unknown: give images of one size"
            )
        return normalize(torch.cat(images), self.data)

"""Binary object masks: geometric shapes drawn with Pillow, silhouettes from Fashion-MNIST.

A mask is a square ``extent x extent`` boolean array; the object is where it is
True. Masks are made once per (shape, variant, extent) in each process and cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from pretrainlab.data.builtin import FASHION_MNIST_DIR
from pretrainlab.data.errors import DatasetError
from pretrainlab.data.idx import read_idx
from pretrainlab.data.scenes.grammar import GEOMETRIC_SHAPES, SILHOUETTES

SIZE_FRACTIONS = {"small": 0.17, "large": 0.28}
"""Size name -> the object's extent (its longer side) as a fraction of the image size."""

SILHOUETTE_ITEMS = {
    "shirt": (19, 59, 71),
    "trouser": (2, 5, 41),
    "sneaker": (12, 43, 60),
    "bag": (18, 53, 62),
}
"""Silhouette shape -> the indices of its items in Fashion-MNIST's t10k file (hand-picked clean outlines)."""

_INK_THRESHOLD = 24  # Fashion-MNIST pixels above this are garment, not background


@dataclass(frozen=True)
class ShapeMask:
    """One shape at one extent, with what layout and rendering need to know about it.

    Attributes:
        mask: ``extent x extent`` bool array, True on the object.
        outline: the mask's boundary pixels (inside the mask), drawn darker.
        area: number of True pixels in ``mask``.
    """

    mask: np.ndarray
    outline: np.ndarray
    area: int


def object_extent(size: str, image_size: int) -> int:
    """The side in pixels of an object of ``size`` in an ``image_size`` image."""
    return max(4, round(SIZE_FRACTIONS[size] * image_size))


def num_variants(shape: str) -> int:
    """How many distinct drawings ``shape`` has (silhouettes come from several items)."""
    return len(SILHOUETTE_ITEMS[shape]) if shape in SILHOUETTE_ITEMS else 1


@functools.cache
def shape_mask(shape: str, variant: int, extent: int) -> ShapeMask:
    """The mask of one shape drawing, fitted into an ``extent x extent`` square.

    Args:
        shape: a name from ``grammar.SHAPES``.
        variant: which drawing, in ``range(num_variants(shape))``.
        extent: the square's side in pixels; the shape touches two opposite sides.

    Returns:
        The mask (read-only arrays, shared between calls).
    """
    mask = _geometric(shape, extent) if shape in GEOMETRIC_SHAPES else _silhouette(shape, variant, extent)
    outline = mask & ~ndimage.binary_erosion(mask, border_value=0)
    mask.flags.writeable = outline.flags.writeable = False
    return ShapeMask(mask=mask, outline=outline, area=int(mask.sum()))


def _geometric(shape: str, extent: int) -> np.ndarray:
    canvas = Image.new("1", (extent, extent), 0)
    draw = ImageDraw.Draw(canvas)
    last = extent - 1
    if shape == "square":
        draw.rectangle((0, 0, last, last), fill=1)
    elif shape == "circle":
        draw.ellipse((0, 0, last, last), fill=1)
    else:  # triangle: isosceles, apex up
        draw.polygon([(last / 2, 0), (last, last), (0, last)], fill=1)
    return np.array(canvas, dtype=bool)


def _silhouette(shape: str, variant: int, extent: int) -> np.ndarray:
    item = _silhouette_items()[shape][variant]
    rows, cols = np.flatnonzero(item.any(axis=1)), np.flatnonzero(item.any(axis=0))
    crop = item[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = extent / max(crop.shape)
    height, width = (max(1, round(side * scale)) for side in crop.shape)
    resized = Image.fromarray(crop.astype(np.uint8) * 255).resize((width, height), Image.Resampling.BILINEAR)
    mask = np.zeros((extent, extent), dtype=bool)
    top, left = (extent - height) // 2, (extent - width) // 2
    mask[top : top + height, left : left + width] = np.asarray(resized) >= 128
    return mask


@functools.cache
def _silhouette_items() -> dict[str, list[np.ndarray]]:
    """Silhouette shape -> the 28 x 28 garment masks of its Fashion-MNIST items."""
    directory = Path(FASHION_MNIST_DIR)
    try:
        images = read_idx(directory / "t10k-images-idx3-ubyte.gz")
        labels = read_idx(directory / "t10k-labels-idx1-ubyte.gz")
    except DatasetError as e:
        raise DatasetError(
            f"scenes need Fashion-MNIST for their silhouettes (Debian package dataset-fashion-mnist): {e}"
        ) from None
    items = {}
    for shape, indices in SILHOUETTE_ITEMS.items():
        if any(labels[i] != SILHOUETTES[shape] for i in indices):
            raise DatasetError(f"{directory}: t10k items {indices} are not all of class {SILHOUETTES[shape]} ({shape})")
        items[shape] = [_garment_mask(images[i]) for i in indices]
    return items


def _garment_mask(image: np.ndarray) -> np.ndarray:
    """The largest connected blob of ink in a Fashion-MNIST image, holes filled."""
    blobs, count = ndimage.label(ndimage.binary_fill_holes(image > _INK_THRESHOLD))
    largest = 1 + int(np.argmax(np.bincount(blobs.ravel())[1:])) if count else 0
    return blobs == largest

"""Drawing a scene: a light background (plain or an skimage texture), then each object's mask in its colour."""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pretrainlab.data.scenes.grammar import COLORS
from pretrainlab.data.scenes.layout import SceneObject
from pretrainlab.data.scenes.masks import object_extent, shape_mask

TEXTURES = ("brick", "grass", "gravel")
"""scikit-image sample images used as backgrounds."""

OUTLINE_SHADE = 0.55
"""An object's outline is its colour times this, so overlapping objects stay apart."""

PNG_COMPRESS_LEVEL = 1


def render(objects: Sequence[SceneObject], image_size: int, rng: np.random.Generator, *, textures: bool) -> np.ndarray:
    """Draws a background, then the objects back to front.

    Args:
        objects: the scene graph, in depth order.
        image_size: the side of the square image in pixels.
        rng: the source of the background's randomness.
        textures: draw a random crop of a scikit-image texture rather than a plain colour.

    Returns:
        ``image_size x image_size x 3`` uint8 RGB. An object's pixels are exactly the
        unoccluded part of its mask, so its box in the scene graph bounds them.
    """
    image = _background(image_size, rng, textures=textures)
    for obj in objects:
        mask = shape_mask(obj.shape, obj.variant, object_extent(obj.size, image_size))
        x, y = obj.position
        extent = mask.mask.shape[0]
        region = image[y : y + extent, x : x + extent]
        color = np.array(COLORS[obj.color], dtype=np.float32)
        region[mask.mask] = color.astype(np.uint8)
        region[mask.outline] = (color * OUTLINE_SHADE).astype(np.uint8)
    return image


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an RGB image, fast to write (low compression)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _background(image_size: int, rng: np.random.Generator, *, textures: bool) -> np.ndarray:
    """A light, nearly grey background, so that every object colour stands out on it."""
    if textures:
        texture = _texture(TEXTURES[rng.integers(len(TEXTURES))], image_size)
        x, y = rng.integers(0, texture.shape[0] - image_size + 1, size=2)
        patch = np.rot90(texture[y : y + image_size, x : x + image_size], k=int(rng.integers(4)))
        gray = rng.uniform(165, 205) + rng.uniform(40, 80) * (patch / np.float32(255) - 0.5)
    else:
        gray = np.full((image_size, image_size), rng.uniform(170, 215), dtype=np.float32)
    tint = rng.uniform(0.92, 1.04, size=3).astype(np.float32)
    return np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)


@functools.cache
def _texture(name: str, image_size: int) -> np.ndarray:
    """A grey texture resized to twice the image size, to crop images from."""
    from skimage import data  # imported only when textures are asked for

    side = 2 * image_size
    return np.asarray(Image.fromarray(getattr(data, name)()).resize((side, side), Image.Resampling.BILINEAR))

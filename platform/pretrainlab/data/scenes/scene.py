"""One generated image and its scene graph, reproducible from (seed, split, index) alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pretrainlab.data.scenes.layout import SceneObject, place_objects
from pretrainlab.data.scenes.render import render
from pretrainlab.data.scenes.splits import SPLIT_FRACTIONS, sample_objects

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 128

# Independent random streams of one image: its picture, and the text written about it.
SCENE_STREAM, TEXT_STREAM = 0, 1


@dataclass(frozen=True)
class Scene:
    """A generated image with its scene graph.

    Attributes:
        split: the split the image belongs to.
        index: its index within the split.
        seed: the dataset seed.
        image: ``H x W x 3`` uint8 RGB.
        objects: the scene graph, in depth order (back-most first).
    """

    split: str
    index: int
    seed: int
    image: np.ndarray
    objects: tuple[SceneObject, ...]

    @property
    def source_id(self) -> str:
        """The id written in the shards' ``source_id`` field: ``scenes:<split>:<index>``."""
        return f"scenes:{self.split}:{self.index}"


def check_image_size(image_size: int) -> None:
    """Raises ValueError unless ``image_size`` is in [``MIN_IMAGE_SIZE``, ``MAX_IMAGE_SIZE``]."""
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {image_size}")


def image_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """The random stream ``stream`` of one image, independent of every other image's."""
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"unknown split {split!r}; known splits: {', '.join(SPLIT_FRACTIONS)}")
    return np.random.default_rng((seed, list(SPLIT_FRACTIONS).index(split), index, stream))


def generate_scene(index: int, split: str, seed: int, image_size: int = 96, *, textures: bool = True) -> Scene:
    """Generates one image and its scene graph.

    The result depends only on the arguments, so images can be generated in any
    order, in parallel, or again later (``source_id`` names the arguments).

    Args:
        index: the image's index within its split.
        split: a key of ``splits.SPLIT_FRACTIONS``; it decides which (shape, colour)
            combinations may appear.
        seed: the dataset seed.
        image_size: the side of the square image, 64 to 128 pixels.
        textures: draw scikit-image textures as backgrounds rather than plain colours.

    Returns:
        The scene.
    """
    check_image_size(image_size)
    rng = image_rng(seed, split, index, SCENE_STREAM)
    objects = place_objects(sample_objects(split, seed, rng), image_size, rng)
    image = render(objects, image_size, rng, textures=textures)
    return Scene(split=split, index=index, seed=seed, image=image, objects=objects)

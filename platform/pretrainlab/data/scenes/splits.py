"""Splits and the attributes objects are drawn with in each: a CoGenT-style compositional split.

Each seed holds out some (shape, colour) combinations: every shape loses
``HELD_OUT_PER_SHAPE`` of the eight colours, and every colour is held out for one
or two shapes, so each shape and each colour still appears in training. ``train``,
``val`` and ``test`` never contain a held-out combination; every
``test_compositional`` image contains at least one.
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np

from pretrainlab.data.scenes.grammar import COLORS, MAX_OBJECTS, MIN_OBJECTS, SHAPES, SIZES
from pretrainlab.data.scenes.layout import ObjectSpec
from pretrainlab.data.scenes.masks import num_variants

COMPOSITIONAL_SPLIT = "test_compositional"
SPLIT_FRACTIONS = {"train": 0.80, "val": 0.05, "test": 0.10, COMPOSITIONAL_SPLIT: 0.05}
"""Split -> its share of the images."""

HELD_OUT_PER_SHAPE = 2
_HELD_OUT_STREAM = 1_000_003  # keeps the held-out draw apart from every per-image random stream


def split_sizes(num_images: int) -> dict[str, int]:
    """Images per split: ``SPLIT_FRACTIONS`` of ``num_images`` rounded, the remainder in train.

    Raises:
        ValueError: ``num_images`` is too small for every split to get an image.
    """
    sizes = {split: round(fraction * num_images) for split, fraction in SPLIT_FRACTIONS.items() if split != "train"}
    sizes = {"train": num_images - sum(sizes.values()), **sizes}
    if min(sizes.values()) < 1:
        raise ValueError(f"num_images={num_images} leaves a split empty ({sizes}); use at least 20")
    return sizes


@functools.cache
def held_out_combinations(seed: int) -> frozenset[tuple[str, str]]:
    """The (shape, colour) combinations that only ``test_compositional`` shows, for ``seed``.

    Colours are shuffled and dealt to shapes (also shuffled) round-robin, two per
    shape, so no colour is held out for more than two shapes.
    """
    rng = np.random.default_rng((seed, _HELD_OUT_STREAM))
    colors = [list(COLORS)[i] for i in rng.permutation(len(COLORS))]
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    slots = range(len(shapes) * HELD_OUT_PER_SHAPE)
    return frozenset((shapes[slot // HELD_OUT_PER_SHAPE], colors[slot % len(colors)]) for slot in slots)


def sample_objects(split: str, seed: int, rng: np.random.Generator) -> list[ObjectSpec]:
    """Draws the objects of one image of ``split``: how many, and each one's attributes.

    In ``train``, ``val`` and ``test`` a shape is uniform and its colour uniform over
    the colours not held out for it. In ``test_compositional`` every (shape, colour)
    combination is uniform, and one object, chosen at random, has a held-out one.
    Draws in which every object has a twin (same shape, colour and size) are
    redrawn, so that some object can always be referred to by its attributes.

    Args:
        split: a key of ``SPLIT_FRACTIONS``.
        seed: the dataset seed (fixes the held-out combinations).
        rng: the image's random stream.

    Returns:
        ``MIN_OBJECTS`` to ``MAX_OBJECTS`` object specs.
    """
    held_out = sorted(held_out_combinations(seed))
    while True:
        count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        combos = []
        for _ in range(count):
            shape = SHAPES[rng.integers(len(SHAPES))]
            colors = [c for c in COLORS if split == COMPOSITIONAL_SPLIT or (shape, c) not in held_out]
            combos.append((shape, colors[rng.integers(len(colors))]))
        if split == COMPOSITIONAL_SPLIT:
            combos[rng.integers(count)] = held_out[rng.integers(len(held_out))]
        attributes = [(shape, color, SIZES[rng.integers(len(SIZES))]) for shape, color in combos]
        if min(Counter(attributes).values()) == 1:
            return [
                ObjectSpec(shape, color, size, int(rng.integers(num_variants(shape))))
                for shape, color, size in attributes
            ]

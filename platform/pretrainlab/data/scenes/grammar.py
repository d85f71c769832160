"""The attribute grammar of scenes: which shapes, colours, sizes and relations exist.

Every object has exactly one value of each attribute in ``ATTRIBUTES``. The words
here are the whole vocabulary of the generated text (plus a few function words), so
that a caption, question or referring expression can be parsed back word by word.
"""

from __future__ import annotations

GEOMETRIC_SHAPES = ("square", "circle", "triangle")
"""Shapes drawn with Pillow."""

SILHOUETTES = {"shirt": 0, "trouser": 1, "sneaker": 7, "bag": 8}
"""Shapes pasted from Fashion-MNIST items: shape name -> Fashion-MNIST class id."""

SHAPES = (*GEOMETRIC_SHAPES, *SILHOUETTES)

COLORS = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
"""Colour name -> RGB (CLEVR's eight colours)."""

SIZES = ("small", "large")
"""Ordered from smaller to bigger."""

ATTRIBUTES = ("size", "color", "shape")
"""Attribute names, in the order adjectives are spoken: "large red circle"."""

VALUES: dict[str, tuple[str, ...]] = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES}
"""Attribute name -> its values."""

SPATIAL_RELATIONS = ("left of", "right of", "above", "below")
SIZE_RELATIONS = ("bigger than", "smaller than")
RELATIONS = SPATIAL_RELATIONS + SIZE_RELATIONS
OPPOSITE = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
    "bigger than": "smaller than",
    "smaller than": "bigger than",
}

NOUN = "object"
"""The noun used when a description leaves the shape out: "the red object"."""

MAX_OBJECTS = 6
MIN_OBJECTS = 2
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
"""Count -> word, for every count a scene can have."""

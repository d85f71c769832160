"""Object placement: where each object goes, what stays visible, and the scene graph it yields.

Objects are placed one by one, each on top of the previous ones (its ``depth`` is its
place in that order, 0 = back-most). A placement is kept only when afterwards

- every object shows at least ``MIN_VISIBLE`` of its pixels, and
- the centres of the visible boxes of any two objects differ by at least
  ``RELATION_MARGIN`` of the image size, horizontally and vertically,

so that every spatial relation between two objects is clear-cut: of any two
objects, exactly one is left of the other and exactly one is above the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pretrainlab.data.scenes.grammar import SIZES
from pretrainlab.data.scenes.masks import object_extent, shape_mask

MIN_VISIBLE = 0.5
"""Least fraction of an object's pixels that no other object may cover."""

RELATION_MARGIN = 0.04
"""Least distance between two objects' box centres on each axis, as a fraction of the image size."""

_PLACEMENT_TRIES = 40  # positions tried for one object before the layout starts over
_LAYOUT_TRIES = 200  # fresh starts before giving up


@dataclass(frozen=True)
class ObjectSpec:
    """What to draw: an object's attributes, before it has a place.

    Attributes:
        shape: a name from ``grammar.SHAPES``.
        color: a name from ``grammar.COLORS``.
        size: a name from ``grammar.SIZES``.
        variant: which drawing of the shape (``masks.num_variants``).
    """

    shape: str
    color: str
    size: str
    variant: int


@dataclass(frozen=True)
class SceneObject:
    """One object of the scene graph.

    Attributes:
        shape: a name from ``grammar.SHAPES``.
        color: a name from ``grammar.COLORS``.
        size: a name from ``grammar.SIZES``.
        variant: which drawing of the shape (``masks.num_variants``).
        depth: drawing order, 0 = back-most; an object may hide parts of those below it.
        position: (x, y) of the top-left corner of the object's mask in the image.
        box: (x1, y1, x2, y2) of the object's visible pixels, in pixel edges:
            column x1 is the first visible column and x2 is one past the last.
        visible: the fraction of the object's pixels left uncovered.
    """

    shape: str
    color: str
    size: str
    variant: int
    depth: int
    position: tuple[int, int]
    box: tuple[float, float, float, float]
    visible: float

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) of the centre of the visible box."""
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


def relation_holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    """Whether "a <relation> b" is true, for a relation in ``grammar.RELATIONS``.

    Spatial relations compare visible-box centres (image y grows downwards); size
    relations compare the size attribute.
    """
    match relation:
        case "left of":
            return a.center[0] < b.center[0]
        case "right of":
            return a.center[0] > b.center[0]
        case "above":
            return a.center[1] < b.center[1]
        case "below":
            return a.center[1] > b.center[1]
        case "bigger than":
            return SIZES.index(a.size) > SIZES.index(b.size)
        case "smaller than":
            return SIZES.index(a.size) < SIZES.index(b.size)
    raise ValueError(f"unknown relation {relation!r}")


def place_objects(specs: Sequence[ObjectSpec], image_size: int, rng: np.random.Generator) -> tuple[SceneObject, ...]:
    """Places objects in the image, front to back in the order given, under the rules above.

    Args:
        specs: the objects, back-most first.
        image_size: the side of the square image in pixels.
        rng: the source of positions.

    Returns:
        The scene objects, in depth order.

    Raises:
        RuntimeError: no layout was found (the objects cannot fit this image size).
    """
    for _ in range(_LAYOUT_TRIES):
        placed = _try_layout(specs, image_size, rng)
        if placed is not None:
            return placed
    raise RuntimeError(f"no layout of {len(specs)} objects fits a {image_size} px image")


def _try_layout(
    specs: Sequence[ObjectSpec], image_size: int, rng: np.random.Generator
) -> tuple[SceneObject, ...] | None:
    margin = RELATION_MARGIN * image_size
    masks = [shape_mask(s.shape, s.variant, object_extent(s.size, image_size)) for s in specs]
    owner = np.full((image_size, image_size), -1, dtype=np.int8)  # index of the object seen at each pixel
    positions: list[tuple[int, int]] = []
    shown = np.zeros(0, dtype=np.int64)  # visible pixels per placed object
    boxes: list[tuple[float, float, float, float]] = []
    for k, mask in enumerate(masks):
        extent = mask.mask.shape[0]
        for _ in range(_PLACEMENT_TRIES):
            x, y = (int(v) for v in rng.integers(0, image_size - extent + 1, size=2))
            candidate = owner.copy()
            candidate[y : y + extent, x : x + extent][mask.mask] = k
            now_shown = np.bincount(candidate.ravel() + 1, minlength=k + 2)[1:]
            if any(now_shown[i] < MIN_VISIBLE * masks[i].area for i in range(k + 1)):
                continue
            now_boxes = [
                box if now_shown[i] == shown[i] else _visible_box(candidate, i, positions[i], masks[i].mask.shape[0])
                for i, box in enumerate(boxes)
            ]
            now_boxes.append(_visible_box(candidate, k, (x, y), extent))
            if _centres_apart(now_boxes, margin):
                owner, shown, boxes = candidate, now_shown, now_boxes
                positions.append((x, y))
                break
        else:
            return None
    return tuple(
        SceneObject(
            shape=spec.shape,
            color=spec.color,
            size=spec.size,
            variant=spec.variant,
            depth=depth,
            position=positions[depth],
            box=boxes[depth],
            visible=float(shown[depth] / masks[depth].area),
        )
        for depth, spec in enumerate(specs)
    )


def _visible_box(owner: np.ndarray, index: int, position: tuple[int, int], extent: int) -> tuple[float, ...]:
    x, y = position
    seen = owner[y : y + extent, x : x + extent] == index
    rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
    return float(x + cols[0]), float(y + rows[0]), float(x + cols[-1] + 1), float(y + rows[-1] + 1)


def _centres_apart(boxes: list[tuple[float, ...]], margin: float) -> bool:
    centres = [((x1 + x2) / 2, (y1 + y2) / 2) for x1, y1, x2, y2 in boxes]
    return all(
        abs(a[0] - b[0]) >= margin and abs(a[1] - b[1]) >= margin
        for i, a in enumerate(centres)
        for b in centres[i + 1 :]
    )

"""Text about a scene graph: descriptions, captions, referring expressions and hard negatives.

The grammar is small enough to parse back word by word:

- a description is ``[size] [color] (shape | "object")``, with at least one attribute
  named: "large red circle", "red object", "squares" (plural);
- captions are claims with a truth value on a scene graph:

  ==================  =====================================================  ===========================
  claim               text                                                   true when
  ==================  =====================================================  ===========================
  ``Listing``         "from left to right: a large red circle, a small ..."  objects, sorted by box centre
                                                                             x, match the items one to one
  ``Count``           "there are three objects"                              exactly that many objects
  ``AttributeCount``  "two green objects", "one large circle"                exactly that many match
  ``Relation``        "a large red circle left of a small blue square",      some match of the first
                      "a red circle bigger than a blue square"               description relates so to
                                                                             some other match of the second
  ==================  =====================================================  ===========================

- a referring expression is ``the <description> [<spatial relation> the <description>]``
  and denotes exactly one object.

Spatial relations compare visible-box centres (``layout.relation_holds``).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from pretrainlab.data.scenes.grammar import (
    ATTRIBUTES,
    MAX_OBJECTS,
    MIN_OBJECTS,
    NOUN,
    NUMBER_WORDS,
    OPPOSITE,
    SIZE_RELATIONS,
    SPATIAL_RELATIONS,
    VALUES,
)
from pretrainlab.data.scenes.layout import SceneObject, relation_holds

ATTRIBUTE_SUBSETS: tuple[tuple[str, ...], ...] = tuple(
    subset for k in range(1, len(ATTRIBUTES) + 1) for subset in itertools.combinations(ATTRIBUTES, k)
)
"""Every non-empty set of attributes, smallest first, each in speaking order."""

MAX_EXPRESSIONS = 3
"""Most referring expressions kept per object."""

_NEGATIVE_TRIES = 20  # random single changes tried before a claim is given up as having no false variant


@dataclass(frozen=True)
class Description:
    """A partial description of an object: the attributes it names, the others None.

    Attributes:
        size: a value of ``grammar.SIZES`` or None.
        color: a value of ``grammar.COLORS`` or None.
        shape: a value of ``grammar.SHAPES`` or None.
    """

    size: str | None = None
    color: str | None = None
    shape: str | None = None

    @classmethod
    def of(cls, obj: SceneObject, attributes: Sequence[str] = ATTRIBUTES) -> Description:
        """The description of ``obj`` that names ``attributes``."""
        return cls(**{a: getattr(obj, a) for a in attributes})

    @property
    def attributes(self) -> tuple[str, ...]:
        """The attributes named, in speaking order."""
        return tuple(a for a in ATTRIBUTES if getattr(self, a) is not None)

    def matches(self, obj: SceneObject) -> bool:
        """Whether ``obj`` has every attribute value named."""
        return (
            (self.size is None or obj.size == self.size)
            and (self.color is None or obj.color == self.color)
            and (self.shape is None or obj.shape == self.shape)
        )

    def select(self, objects: Sequence[SceneObject]) -> list[SceneObject]:
        """The objects that match, in their order."""
        return [obj for obj in objects if self.matches(obj)]

    def phrase(self, *, plural: bool = False) -> str:
        """Its words: "large red circle", or with ``plural`` "large red circles"."""
        words = [self.size, self.color, self.shape or NOUN]
        return " ".join(w for w in words if w) + ("s" if plural else "")

    def with_one_change(self, rng: np.random.Generator) -> Description:
        """The same description with one named attribute set to another value."""
        attribute = self.attributes[rng.integers(len(self.attributes))]
        others = [v for v in VALUES[attribute] if v != getattr(self, attribute)]
        return replace(self, **{attribute: others[rng.integers(len(others))]})


def indefinite(phrase: str) -> str:
    """The phrase with "a" or "an" in front."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


class Claim(Protocol):
    """A caption with a truth value on a scene graph (``Listing``, ``Count``, ``AttributeCount``, ``Relation``)."""

    def text(self) -> str:
        """The caption."""
        ...

    def holds(self, objects: Sequence[SceneObject]) -> bool:
        """Whether the caption is true of the scene graph ``objects``."""
        ...

    def with_one_change(self, rng: np.random.Generator) -> Claim:
        """The claim with one attribute, relation or number changed at random; it may still hold."""
        ...


@dataclass(frozen=True)
class Listing:
    """Every object, left to right: "from left to right: a large red circle, ... and a small gray bag"."""

    items: tuple[Description, ...]

    def text(self) -> str:
        phrases = [indefinite(d.phrase()) for d in self.items]
        return f"from left to right: {', '.join(phrases[:-1])} and {phrases[-1]}"

    def holds(self, objects: Sequence[SceneObject]) -> bool:
        ordered = sorted(objects, key=lambda o: o.center[0])
        return len(ordered) == len(self.items) and all(d.matches(o) for d, o in zip(self.items, ordered, strict=True))

    def with_one_change(self, rng: np.random.Generator) -> Listing:
        items = list(self.items)
        i = rng.integers(len(items))
        items[i] = items[i].with_one_change(rng)
        return Listing(tuple(items))


@dataclass(frozen=True)
class Count:
    """How many objects there are: "there are three objects"."""

    number: int

    def text(self) -> str:
        return f"there are {NUMBER_WORDS[self.number]} {NOUN}s"

    def holds(self, objects: Sequence[SceneObject]) -> bool:
        return len(objects) == self.number

    def with_one_change(self, rng: np.random.Generator) -> Count:
        others = [n for n in range(MIN_OBJECTS, MAX_OBJECTS + 1) if n != self.number]
        return Count(others[rng.integers(len(others))])


@dataclass(frozen=True)
class AttributeCount:
    """How many objects fit a description: "two green objects", "one large circle"."""

    number: int
    description: Description

    def text(self) -> str:
        return f"{NUMBER_WORDS[self.number]} {self.description.phrase(plural=self.number != 1)}"

    def holds(self, objects: Sequence[SceneObject]) -> bool:
        return len(self.description.select(objects)) == self.number

    def with_one_change(self, rng: np.random.Generator) -> AttributeCount:
        if rng.random() < 0.5:
            return replace(self, description=self.description.with_one_change(rng))
        others = [n for n in range(1, MAX_OBJECTS + 1) if n != self.number]
        return replace(self, number=others[rng.integers(len(others))])


@dataclass(frozen=True)
class Relation:
    """Two objects and a relation: "a large red circle left of a small blue square"."""

    subject: Description
    relation: str
    landmark: Description

    def text(self) -> str:
        return f"{indefinite(self.subject.phrase())} {self.relation} {indefinite(self.landmark.phrase())}"

    def holds(self, objects: Sequence[SceneObject]) -> bool:
        landmarks = self.landmark.select(objects)
        return any(
            relation_holds(self.relation, a, b) for a in self.subject.select(objects) for b in landmarks if a is not b
        )

    def with_one_change(self, rng: np.random.Generator) -> Relation:
        part = rng.integers(3)
        if part == 0:
            return replace(self, subject=self.subject.with_one_change(rng))
        if part == 1:
            return replace(self, landmark=self.landmark.with_one_change(rng))
        return replace(self, relation=OPPOSITE[self.relation])


COUNTED_ATTRIBUTES: tuple[tuple[str, ...], ...] = tuple(s for s in ATTRIBUTE_SUBSETS if len(s) <= 2)
"""The attribute sets an ``AttributeCount`` names: one or two attributes."""

COMPARED_ATTRIBUTES = ("color", "shape")
"""What the descriptions of a size comparison name (sizes left out: the relation states them)."""


def captions(objects: Sequence[SceneObject], rng: np.random.Generator) -> list[Claim]:
    """True captions of a scene, one per kind of claim.

    A listing of every object, the object count, the count of one or two random
    attribute values, a spatial relation between two random objects, and, when
    the scene has both sizes, a size comparison (sizes left out of its descriptions).

    Args:
        objects: the scene graph.
        rng: the source of the random choices.

    Returns:
        Four or five claims, each true for ``objects``.
    """
    n = len(objects)
    counted = Description.of(objects[rng.integers(n)], COUNTED_ATTRIBUTES[rng.integers(len(COUNTED_ATTRIBUTES))])
    a, b = (objects[i] for i in rng.choice(n, size=2, replace=False))
    spatial = [r for r in SPATIAL_RELATIONS if relation_holds(r, a, b)]  # one horizontal, one vertical
    claims: list[Claim] = [
        _listing(objects),
        Count(n),
        AttributeCount(len(counted.select(objects)), counted),
        Relation(Description.of(a), spatial[rng.integers(len(spatial))], Description.of(b)),
    ]
    large, small = ([o for o in objects if o.size == s] for s in ("large", "small"))
    if large and small:
        big, little = large[rng.integers(len(large))], small[rng.integers(len(small))]
        pair = (big, "bigger than", little) if rng.random() < 0.5 else (little, "smaller than", big)
        claims.append(
            Relation(
                Description.of(pair[0], COMPARED_ATTRIBUTES), pair[1], Description.of(pair[2], COMPARED_ATTRIBUTES)
            )
        )
    return claims


def true_claims(objects: Sequence[SceneObject]) -> set[Claim]:
    """Every claim true of a scene among those ``captions`` and ``hard_negative`` can write for any scene.

    Those claims keep their form when changed (a listing names every attribute, a count of a
    description names one or two, a spatial relation relates full descriptions and a size
    comparison colour and shape), so a caption or hard negative written for one scene is true of
    ``objects`` exactly when it is in this set: its listing, its count, each one- or two-attribute
    description's count, and each relation between two of its objects.
    """
    claims: set[Claim] = {_listing(objects), Count(len(objects))}
    for attributes in COUNTED_ATTRIBUTES:
        for description in {Description.of(o, attributes) for o in objects}:
            claims.add(AttributeCount(len(description.select(objects)), description))
    for a, b in itertools.permutations(objects, 2):
        for relation in SPATIAL_RELATIONS:
            if relation_holds(relation, a, b):
                claims.add(Relation(Description.of(a), relation, Description.of(b)))
        for relation in SIZE_RELATIONS:
            if relation_holds(relation, a, b):
                compared = (Description.of(a, COMPARED_ATTRIBUTES), Description.of(b, COMPARED_ATTRIBUTES))
                claims.add(Relation(compared[0], relation, compared[1]))
    return claims


CAPTION_KINDS = ("listing", "count", "attribute_count", "spatial_relation", "size_relation")
"""The kinds of caption the grammar writes, as :func:`caption_kind` names them."""


def caption_kind(text: str) -> str:
    """Which kind of claim a caption or hard negative of this grammar is, one of ``CAPTION_KINDS``.

    Raises:
        ValueError: ``text`` is no caption of this grammar's forms.
    """
    words = f" {text} "
    if text.startswith("from left to right: "):
        return "listing"
    if any(text == Count(number).text() for number in range(MIN_OBJECTS, MAX_OBJECTS + 1)):
        return "count"
    if any(f" {relation} " in words for relation in SPATIAL_RELATIONS):
        return "spatial_relation"
    if any(f" {relation} " in words for relation in SIZE_RELATIONS):
        return "size_relation"
    if text.split(" ", 1)[0] in NUMBER_WORDS[1:]:
        return "attribute_count"
    raise ValueError(f"not a caption of the scenes grammar: {text!r}")


EXPRESSION_KINDS = (*("-".join(subset) for subset in ATTRIBUTE_SUBSETS), "relation")
"""The kinds of referring expression, as :func:`expression_kind` names them: the attributes a lone description
names ("size-color"), or "relation" (a description related to a landmark)."""


def expression_kind(text: str) -> str:
    """Which kind of referring expression of this grammar ``text`` is, one of ``EXPRESSION_KINDS``.

    Raises:
        ValueError: ``text`` is no referring expression of this grammar's forms.
    """
    if text.startswith("the "):
        head = text.removeprefix("the ")
        for relation in SPATIAL_RELATIONS:
            target, found, landmark = head.partition(f" {relation} the ")
            if found and _named_attributes(target) and _named_attributes(landmark):
                return "relation"
        if named := _named_attributes(head):
            return "-".join(named)
    raise ValueError(f"not a referring expression of the scenes grammar: {text!r}")


def _named_attributes(phrase: str) -> tuple[str, ...]:
    """The attributes a singular description (``[size] [color] (shape | "object")``) names, in speaking order;
    () when ``phrase`` is no such description."""
    words = phrase.split(" ")
    named = []
    for attribute in ATTRIBUTES:
        if words and words[0] in VALUES[attribute]:
            named.append(attribute)
            words.pop(0)
    complete = words == [] if named[-1:] == ["shape"] else words == [NOUN]
    return tuple(named) if named and complete else ()


def _listing(objects: Sequence[SceneObject]) -> Listing:
    return Listing(tuple(Description.of(o) for o in sorted(objects, key=lambda o: o.center[0])))


def hard_negative(claim: Claim, objects: Sequence[SceneObject], rng: np.random.Generator) -> Claim | None:
    """A false variant of a true claim: one attribute, relation or count changed.

    Args:
        claim: a claim true for ``objects``.
        objects: the scene graph.
        rng: the source of the random changes.

    Returns:
        The first random single change that makes the claim false, or None if none
        of a few tries did (e.g. "a red circle left of a blue square" stays true when
        moved to "above" and the scene has such a pair too).
    """
    for _ in range(_NEGATIVE_TRIES):
        changed = claim.with_one_change(rng)
        if not changed.holds(objects):
            return changed
    return None


@dataclass(frozen=True)
class Reference:
    """A referring expression: "the red circle", "the red circle left of the blue square".

    Attributes:
        target: what the referred object is.
        relation: a spatial relation to a landmark, when ``target`` alone fits several objects.
        landmark: a description that fits exactly one object, None without a relation.
    """

    target: Description
    relation: str | None = None
    landmark: Description | None = None

    def text(self) -> str:
        head = f"the {self.target.phrase()}"
        return head if self.relation is None else f"{head} {self.relation} the {self.landmark.phrase()}"

    def resolve(self, objects: Sequence[SceneObject]) -> list[SceneObject]:
        """The objects the expression fits."""
        fits = self.target.select(objects)
        if self.relation is None:
            return fits
        landmarks = self.landmark.select(objects)
        return [o for o in fits if any(relation_holds(self.relation, o, lm) for lm in landmarks if lm is not o)]


def minimal_descriptions(obj: SceneObject, objects: Sequence[SceneObject]) -> list[Description]:
    """The descriptions with the fewest attributes that fit ``obj`` and nothing else in ``objects``.

    Returns:
        All such descriptions (e.g. "red object" and "circle"), or [] when another
        object has the same size, colour and shape.
    """
    for k in range(1, len(ATTRIBUTES) + 1):
        found = [
            d for d in (Description.of(obj, s) for s in ATTRIBUTE_SUBSETS if len(s) == k) if d.select(objects) == [obj]
        ]
        if found:
            return found
    return []


def referring_expressions(objects: Sequence[SceneObject], rng: np.random.Generator) -> dict[int, list[Reference]]:
    """Expressions that each pick out exactly one object.

    An object gets its minimal attribute descriptions. An object that attributes
    cannot single out (it has a twin) gets a relation to a landmark: the fewest
    target attributes that, with one spatial relation to a uniquely described other
    object, leave only it. At most ``MAX_EXPRESSIONS`` per object are kept, at random.

    Args:
        objects: the scene graph.
        rng: the source of the random choices.

    Returns:
        Object index -> its expressions; an object no expression can single out
        (twins with no landmark that tells them apart) is left out. Some object
        always has an entry, as ``splits.sample_objects`` never makes every object a twin.
    """
    unique = [minimal_descriptions(obj, objects) for obj in objects]
    landmarks = [(obj, found[0]) for obj, found in zip(objects, unique, strict=True) if found]
    expressions = {}
    for i, obj in enumerate(objects):
        found = [Reference(d) for d in unique[i]] or _relational_references(obj, objects, landmarks)
        if found:
            keep = rng.permutation(len(found))[:MAX_EXPRESSIONS]
            expressions[i] = [found[k] for k in sorted(keep)]
    return expressions


def _relational_references(
    obj: SceneObject, objects: Sequence[SceneObject], landmarks: list[tuple[SceneObject, Description]]
) -> list[Reference]:
    """The references to ``obj`` through one relation to a landmark, with the fewest target attributes."""
    for k in range(1, len(ATTRIBUTES) + 1):
        found = []
        for subset in (s for s in ATTRIBUTE_SUBSETS if len(s) == k):
            target = Description.of(obj, subset)
            fits = target.select(objects)
            for landmark, landmark_description in landmarks:
                if target.matches(landmark):
                    continue
                for relation in SPATIAL_RELATIONS:
                    if [o for o in fits if relation_holds(relation, o, landmark)] == [obj]:
                        found.append(Reference(target, relation, landmark_description))
        if found:
            return found
    return []

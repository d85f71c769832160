"""CLEVR-style questions with one correct answer each, and answer rebalancing.

Question types (the text is parseable with the grammar of ``language``):

===============  ====================================================  ==================
type             text                                                  answer
===============  ====================================================  ==================
``exists``       "is there a large red circle?"                        yes / no
``count``        "how many red objects are there?"                     "0" ... "6"
``query_color``  "what color is the large circle?"                     a colour
``query_shape``  "what shape is the red object?"                       a shape
``query_size``   "what size is the red circle?"                        small / large
``compare``      "is the red circle bigger than the blue square?"      yes / no
``relate``       "what shape is the object left of the green square?"  a shape or a colour
===============  ====================================================  ==================

A question is only asked when it is well posed: every "the ..." it contains fits
exactly one object of the scene (for ``relate``, exactly one object stands in the
relation to the landmark).

Rebalancing: ``AnswerBalancer`` picks each image's question of each type from all
the candidates the image offers, so that the answers of each type and template stay
near uniform over a block of images. A model that sees only the question text and
answers the majority answer of its type (template) is right at most chance + 5
(+ 8) points of the time, plus one question per block.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pretrainlab.data.scenes.grammar import (
    ATTRIBUTES,
    COLORS,
    MAX_OBJECTS,
    NOUN,
    SHAPES,
    SIZE_RELATIONS,
    SIZES,
    SPATIAL_RELATIONS,
    VALUES,
)
from pretrainlab.data.scenes.language import ATTRIBUTE_SUBSETS, Description, indefinite, minimal_descriptions
from pretrainlab.data.scenes.layout import SceneObject, relation_holds

ANSWERS: dict[str, tuple[str, ...]] = {
    "exists": ("yes", "no"),
    "count": tuple(str(n) for n in range(MAX_OBJECTS + 1)),
    "query_color": tuple(COLORS),
    "query_shape": SHAPES,
    "query_size": SIZES,
    "compare": ("yes", "no"),
    "relate": (*SHAPES, *COLORS),
}
"""Question type -> every answer it can have (chance for a type is one over their number)."""

QUESTION_TYPES = tuple(ANSWERS)

MAX_ANSWER_SHARE = 0.05
"""Most that one answer's share of a type's questions may exceed chance (one over the type's answers)."""

MAX_TEMPLATE_ANSWER_SHARE = 0.08
"""Most that one answer's share of a template's questions may exceed the type's chance."""

_ABSENT_TRIES = 10  # random descriptions tried when looking for one that fits no object


@dataclass(frozen=True)
class Question:
    """A question about one scene, with its answer.

    Attributes:
        type: a key of ``ANSWERS``.
        template: the question with its attribute values left out, e.g. ``count:size+color``.
        text: the question.
        answer: its one correct answer.
    """

    type: str
    template: str
    text: str
    answer: str


def candidate_questions(objects: Sequence[SceneObject], rng: np.random.Generator) -> dict[str, list[Question]]:
    """Every well-posed question of each type that this scene offers for rebalancing.

    ``exists`` and ``count`` get, per template, questions about present and absent
    attribute values; the others get one question per uniquely describable object
    (or pair, or landmark and relation).

    Args:
        objects: the scene graph.
        rng: the source of the random choices (which object or absent value to ask about).

    Returns:
        Question type -> its candidates (possibly none).
    """
    return {
        "exists": _exists(objects, rng),
        "count": _count(objects, rng),
        **{f"query_{attribute}": _query(attribute, objects) for attribute in ATTRIBUTES},
        "compare": _compare(objects),
        "relate": _relate(objects),
    }


class AnswerBalancer:
    """Chooses questions so that the answers of each type, and of each template, stay near uniform.

    It keeps running answer counts per question type and per template. Of an
    image's candidates of one type, it rejects those whose answer already holds more
    than chance plus ``MAX_ANSWER_SHARE`` of the type's questions so far, or chance
    plus ``MAX_TEMPLATE_ANSWER_SHARE`` of the template's (chance is one over the
    number of the type's answers, ``ANSWERS``). Of the rest it takes the answer asked
    least so far for the type; then the template for which that answer is least
    ahead of the template's rarest answer; then chance. Always answering a type's
    (template's) majority answer thus scores at most chance plus that margin, plus
    one question.
    """

    def __init__(self) -> None:
        self._by_type: dict[str, Counter[str]] = {t: Counter() for t in QUESTION_TYPES}
        self._by_template: dict[str, Counter[str]] = {}

    def choose(self, candidates: Sequence[Question], rng: np.random.Generator) -> Question | None:
        """Picks one of ``candidates`` (all of one type); None when there are none or all are rejected."""
        if not candidates:
            return None
        kind = candidates[0].type
        chance = 1 / len(ANSWERS[kind])
        by_type = self._by_type[kind]
        type_cap = (chance + MAX_ANSWER_SHARE) * by_type.total()
        templates = {q.template: self._by_template.setdefault(q.template, Counter()) for q in candidates}
        template_cap = {name: (chance + MAX_TEMPLATE_ANSWER_SHARE) * c.total() for name, c in templates.items()}
        rarest = {name: min(c[a] for a in ANSWERS[kind]) for name, c in templates.items()}
        acceptable = [
            q
            for q in (candidates[i] for i in rng.permutation(len(candidates)))
            if by_type[q.answer] <= type_cap and templates[q.template][q.answer] <= template_cap[q.template]
        ]
        if not acceptable:
            return None
        chosen = min(
            acceptable, key=lambda q: (by_type[q.answer], templates[q.template][q.answer] - rarest[q.template])
        )
        by_type[chosen.answer] += 1
        templates[chosen.template][chosen.answer] += 1
        return chosen


def _exists(objects: Sequence[SceneObject], rng: np.random.Generator) -> list[Question]:
    questions = []
    for subset in ATTRIBUTE_SUBSETS:
        template = f"exists:{'+'.join(subset)}"
        present = Description.of(objects[rng.integers(len(objects))], subset)
        questions.append(Question("exists", template, f"is there {indefinite(present.phrase())}?", "yes"))
        absent = _absent(subset, objects, rng)
        if absent is not None:
            questions.append(Question("exists", template, f"is there {indefinite(absent.phrase())}?", "no"))
    return questions


def _count(objects: Sequence[SceneObject], rng: np.random.Generator) -> list[Question]:
    questions = []
    for subset in (s for s in ATTRIBUTE_SUBSETS if len(s) < len(ATTRIBUTES)):
        present = dict.fromkeys(Description.of(obj, subset) for obj in objects)
        absent = _absent(subset, objects, rng)
        for description in [*present, *([absent] if absent is not None else [])]:
            text = f"how many {description.phrase(plural=True)} are there?"
            answer = str(len(description.select(objects)))
            questions.append(Question("count", f"count:{'+'.join(subset)}", text, answer))
    return questions


def _query(attribute: str, objects: Sequence[SceneObject]) -> list[Question]:
    subsets = [s for s in ATTRIBUTE_SUBSETS if attribute not in s]
    questions = []
    for obj in objects:
        for subset in subsets:
            description = Description.of(obj, subset)
            if description.select(objects) == [obj]:
                text = f"what {attribute} is the {description.phrase()}?"
                template = f"query_{attribute}:{'+'.join(subset)}"
                questions.append(Question(f"query_{attribute}", template, text, getattr(obj, attribute)))
    return questions


def _compare(objects: Sequence[SceneObject]) -> list[Question]:
    named = []  # objects with a description that does not give their size away
    for obj in objects:
        unique = [
            d
            for s in (("color",), ("shape",), ("color", "shape"))
            if (d := Description.of(obj, s)).select(objects) == [obj]
        ]
        if unique:
            named.append((obj, unique[0]))
    questions = []
    for (a, a_description), (b, b_description) in itertools.permutations(named, 2):
        for relation in SIZE_RELATIONS:
            text = f"is the {a_description.phrase()} {relation} the {b_description.phrase()}?"
            answer = "yes" if relation_holds(relation, a, b) else "no"
            questions.append(Question("compare", f"compare:{relation}", text, answer))
    return questions


def _relate(objects: Sequence[SceneObject]) -> list[Question]:
    questions = []
    for landmark in objects:
        described = minimal_descriptions(landmark, objects)
        if not described:
            continue
        for relation in SPATIAL_RELATIONS:
            related = [o for o in objects if o is not landmark and relation_holds(relation, o, landmark)]
            if len(related) != 1:
                continue
            for attribute in ("shape", "color"):
                text = f"what {attribute} is the {NOUN} {relation} the {described[0].phrase()}?"
                questions.append(Question("relate", f"relate:{attribute}", text, getattr(related[0], attribute)))
    return questions


def _absent(subset: Sequence[str], objects: Sequence[SceneObject], rng: np.random.Generator) -> Description | None:
    """A random description naming ``subset`` that fits no object, if a few tries find one."""
    for _ in range(_ABSENT_TRIES):
        description = Description(**{a: VALUES[a][rng.integers(len(VALUES[a]))] for a in subset})
        if not description.select(objects):
            return description
    return None

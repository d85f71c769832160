"""The generated scenes set: every text checked against the scene graph by a parser written here.

The checks below parse captions, questions and referring expressions word by word
and evaluate them on the scene graph with their own code; they share only the
vocabulary with the generator.
"""

from __future__ import annotations

import io
import itertools
import re
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pretrainlab.data.scenes import (
    SceneObject,
    generate_scene,
    held_out_combinations,
    referring_expressions,
    write_scenes,
)
from pretrainlab.data.scenes.grammar import ATTRIBUTES, COLORS, SHAPES, SIZES
from pretrainlab.data.scenes.language import CAPTION_KINDS, EXPRESSION_KINDS, caption_kind, expression_kind
from pretrainlab.data.shards import load_manifest, shard_paths, verify_dataset

NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
RELATION = r"(left of|right of|above|below|bigger than|smaller than)"
SPATIAL = r"(left of|right of|above|below)"
CHANCE = {"exists": 2, "count": 7, "query_color": 8, "query_shape": 7, "query_size": 2, "compare": 2, "relate": 15}
SPLITS = ["train", "val", "test", "test_compositional"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """300 images at 64 px with textures, written by 2 worker processes."""
    out = tmp_path_factory.mktemp("scenes") / "small"
    return write_scenes(out, num_images=300, image_size=64, seed=1, shard_size=100, workers=2)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """4,000 images (400 in test) for the statistics: question-only baseline, compositional split."""
    out = tmp_path_factory.mktemp("scenes") / "large"
    return write_scenes(out, num_images=4000, image_size=64, seed=0, textures=False, workers=2)


def rows(dataset, split, columns=None) -> list[dict]:
    return pa.concat_tables(pq.read_table(p, columns=columns) for p in shard_paths(dataset, split)).to_pylist()


def scene_of(row, seed: int):
    _, split, index = row["source_id"].split(":")
    return generate_scene(int(index), split, seed, row["height"])


# ---------------------------------------------------------------- an independent reading of the text


def centre(obj: SceneObject) -> tuple[float, float]:
    x1, y1, x2, y2 = obj.box
    return (x1 + x2) / 2, (y1 + y2) / 2


def related(a: SceneObject, relation: str, b: SceneObject) -> bool:
    (ax, ay), (bx, by) = centre(a), centre(b)
    return {
        "left of": ax < bx,
        "right of": ax > bx,
        "above": ay < by,
        "below": ay > by,
        "bigger than": a.size == "large" and b.size == "small",
        "smaller than": a.size == "small" and b.size == "large",
    }[relation]


def parse_description(text: str) -> dict[str, str]:
    """ "large red circles" -> {"size": "large", "color": "red", "shape": "circle"}."""
    words = re.sub(r"^(the|an?) ", "", text).split()
    *adjectives, noun = words
    noun = noun[:-1] if noun.endswith("s") else noun
    attributes = {}
    for word in adjectives:
        key = "size" if word in SIZES else "color" if word in COLORS else None
        assert key is not None and key not in attributes, text
        attributes[key] = word
    if noun != "object":
        assert noun in SHAPES, text
        attributes["shape"] = noun
    assert attributes, text
    return attributes


def fits(obj: SceneObject, attributes: dict[str, str]) -> bool:
    return all(getattr(obj, key) == value for key, value in attributes.items())


def fitting(objects, text: str) -> list[SceneObject]:
    return [o for o in objects if fits(o, parse_description(text))]


def the(objects, text: str) -> SceneObject:
    """The one object "the <text>" denotes; fails when it is not exactly one."""
    found = fitting(objects, text)
    assert len(found) == 1, f"'the {text}' fits {len(found)} objects"
    return found[0]


def claim_is_true(caption: str, objects) -> bool:
    if m := re.fullmatch(r"from left to right: (.+)", caption):
        items = re.split(r", | and ", m[1])
        ordered = sorted(objects, key=lambda o: centre(o)[0])
        return len(items) == len(ordered) and all(
            fits(o, parse_description(i)) for i, o in zip(items, ordered, strict=True)
        )
    if m := re.fullmatch(r"there are (\w+) objects", caption):
        return NUMBERS.index(m[1]) == len(objects)
    if m := re.fullmatch(rf"an? (.+?) {RELATION} an? (.+)", caption):
        return any(related(a, m[2], b) for a in fitting(objects, m[1]) for b in fitting(objects, m[3]) if a is not b)
    m = re.fullmatch(r"(\w+) (.+)", caption)
    assert m and m[1] in NUMBERS, caption
    return NUMBERS.index(m[1]) == len(fitting(objects, m[2]))


def answer(question: str, objects) -> tuple[str, str]:
    """(question type, answer) computed from the scene graph; fails on an ill-posed question."""
    if m := re.fullmatch(r"is there an? (.+)\?", question):
        return "exists", "yes" if fitting(objects, m[1]) else "no"
    if m := re.fullmatch(r"how many (.+) are there\?", question):
        return "count", str(len(fitting(objects, m[1])))
    if m := re.fullmatch(rf"what (shape|color) is the object {SPATIAL} the (.+)\?", question):
        landmark = the(objects, m[3])
        found = [o for o in objects if o is not landmark and related(o, m[2], landmark)]
        assert len(found) == 1, question
        return "relate", getattr(found[0], m[1])
    if m := re.fullmatch(r"what (shape|color|size) is the (.+)\?", question):
        assert m[1] not in parse_description(m[2]), question
        return f"query_{m[1]}", getattr(the(objects, m[2]), m[1])
    if m := re.fullmatch(r"is the (.+) (bigger|smaller) than the (.+)\?", question):
        assert "size" not in parse_description(m[1]) and "size" not in parse_description(m[3]), question
        a, b = the(objects, m[1]), the(objects, m[3])
        return "compare", "yes" if related(a, f"{m[2]} than", b) else "no"
    raise AssertionError(f"unparsed question {question!r}")


def referent(expression: str, objects) -> list[SceneObject]:
    m = re.fullmatch(rf"the (.+?)(?: {SPATIAL} the (.+))?", expression)
    assert m, expression
    targets = fitting(objects, m[1])
    if m[2] is None:
        return targets
    landmark = the(objects, m[3])
    return [o for o in targets if o is not landmark and related(o, m[2], landmark)]


def template(question: str) -> str:
    """The question with its attribute words masked: the most a question-only model can key on."""
    masked = []
    for word in question.rstrip("?").split():
        noun = word[:-1] if word.endswith("s") else word
        masked.append(
            "<size>" if word in SIZES else "<color>" if word in COLORS else "<shape>" if noun in SHAPES else word
        )
    return " ".join(masked)


# ---------------------------------------------------------------- the written datasets


def test_four_datasets_verify_and_share_the_images(small):
    assert sorted(small) == ["caption", "grounding", "retrieval", "vqa"]
    manifests = {task: verify_dataset(path) for task, path in small.items()}
    for task, manifest in manifests.items():
        assert manifest["task"] == task
        assert {s: e["count"] for s, e in manifest["splits"].items()} == dict(
            zip(SPLITS, [240, 15, 30, 15], strict=True)
        )
        metadata = manifest["metadata"]
        assert (metadata["seed"], metadata["image_size"], metadata["generator"]) == (1, 64, "scenes-2")
        assert sorted(map(tuple, metadata["held_out"])) == sorted(held_out_combinations(1))
    for split in SPLITS:
        images = {task: rows(path, split, ["image", "source_id"]) for task, path in small.items()}
        assert images["caption"] == images["vqa"] == images["grounding"] == images["retrieval"]

    answers = Counter(
        q["answers"][0] for s in SPLITS for r in rows(small["vqa"], s, ["questions"]) for q in r["questions"]
    )
    vocab = manifests["vqa"]["metadata"]["answer_vocab"]
    assert sorted(vocab) == sorted(answers) and [answers[a] for a in vocab] == sorted(answers.values(), reverse=True)
    assert manifests["grounding"]["metadata"]["categories"] == list(SHAPES)


def test_images_are_their_scene_graphs_and_boxes_lie_inside(small):
    for split in SPLITS:
        for row in rows(small["grounding"], split):
            scene = scene_of(row, seed=1)
            image = np.asarray(Image.open(io.BytesIO(row["image"])))
            assert row["image_format"] == "png" and image.shape == (64, 64, 3)
            np.testing.assert_array_equal(image, scene.image)
            assert 2 <= len(scene.objects) <= 6
            for obj in scene.objects:
                x1, y1, x2, y2 = obj.box
                assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64 and obj.visible >= 0.5
                inside = image[int(y1) : int(y2), int(x1) : int(x2)].reshape(-1, 3)
                assert (inside == COLORS[obj.color]).all(axis=1).any(), f"no {obj.color} pixel in the box of {obj}"
            for ref in row["refs"]:
                assert 0 <= ref["box"][0] < ref["box"][2] <= 64 and 0 <= ref["box"][1] < ref["box"][3] <= 64


def test_every_referring_expression_picks_out_exactly_one_object(small):
    relational, kinds = 0, Counter()
    for split in SPLITS:
        for row in rows(small["grounding"], split):
            objects = scene_of(row, seed=1).objects
            assert row["refs"], row["source_id"]
            for ref in row["refs"]:
                for expression in ref["expressions"]:
                    (obj,) = referent(expression, objects)
                    assert list(obj.box) == ref["box"] and obj.shape == ref["category"]
                    named = parse_description(re.fullmatch(rf"the (.+?)(?: {SPATIAL} the .+)?", expression)[1])
                    unique = [d for d in descriptions_of(obj) if [o for o in objects if fits(o, d)] == [obj]]
                    if " the " in expression:  # a relation only when no attributes single the object out
                        assert not unique, expression
                        assert expression_kind(expression) == "relation"
                        relational += 1
                    else:  # the fewest attributes that do
                        assert len(named) == min(map(len, unique)), expression
                        assert expression_kind(expression) == "-".join(a for a in ATTRIBUTES if a in named)
                    kinds[expression_kind(expression)] += 1
    assert relational > 0
    assert set(kinds) <= set(EXPRESSION_KINDS) and {"color", "shape", "size-shape", "relation"} <= set(kinds), kinds


@pytest.mark.parametrize(
    "text", ["the object", "a red circle", "the red circle near the square", "the circle left of the", "the red"]
)
def test_expression_kind_refuses_what_the_grammar_does_not_say(text):
    with pytest.raises(ValueError, match="not a referring expression of the scenes grammar"):
        expression_kind(text)


def test_a_relation_tells_twins_apart():
    def obj(color, shape, x, y):
        return SceneObject(shape, color, "small", 0, 0, (x, y), (x, y, x + 10.0, y + 10.0), 1.0)

    twins = [obj("red", "circle", 0, 0), obj("blue", "square", 30, 30), obj("red", "circle", 60, 10)]
    references = referring_expressions(twins, np.random.default_rng(0))
    texts = {i: [r.text() for r in refs] for i, refs in references.items()}
    assert texts[1] == ["the blue object", "the square"]
    assert any(" left of the " in t for t in texts[0]) and any(" right of the " in t for t in texts[2])
    for i, expressions in texts.items():
        for expression in expressions:
            assert referent(expression, twins) == [twins[i]]


def test_every_answer_follows_from_the_scene_graph(small):
    asked = Counter()
    for split in SPLITS:
        for row in rows(small["vqa"], split):
            objects = scene_of(row, seed=1).objects
            for q in row["questions"]:
                kind, expected = answer(q["question"], objects)
                assert q["question_type"] == kind and q["answers"] == [expected], q
                asked[kind] += 1
    assert set(asked) == set(CHANCE)


def test_captions_are_true_and_hard_negatives_false_by_one_word(small):
    for split in SPLITS:
        for row in rows(small["retrieval"], split):
            objects = scene_of(row, seed=1).objects
            assert len(row["captions"]) >= 4 and row["negatives"]
            for caption in row["captions"]:
                assert claim_is_true(caption, objects), caption
            for negative in row["negatives"]:
                assert not claim_is_true(negative, objects), negative
                assert any(one_word_apart(negative, caption) for caption in row["captions"]), negative
    assert rows(small["caption"], "val", ["captions"]) == rows(small["retrieval"], "val", ["captions"])


def test_also_true_holds_exactly_the_other_texts_of_the_split_that_are_true(small):
    for split in ("val", "test"):
        split_rows = rows(small["retrieval"], split)
        gallery = {text for row in split_rows for text in (*row["captions"], *row["negatives"])}
        found = 0
        for row in split_rows:
            objects = scene_of(row, seed=1).objects
            expected = {text for text in gallery - set(row["captions"]) if claim_is_true(text, objects)}
            assert set(row["also_true"]) == expected, row["source_id"]
            assert len(row["also_true"]) == len(expected)  # no repeats
            found += len(expected)
        assert found > len(split_rows)  # partial captions ("two red objects") are true of many images


def kind_of(caption: str) -> str:
    """The kind of claim, read as :func:`claim_is_true` reads it."""
    if re.fullmatch(r"from left to right: (.+)", caption):
        return "listing"
    if re.fullmatch(r"there are (\w+) objects", caption):
        return "count"
    if m := re.fullmatch(rf"an? (.+?) {RELATION} an? (.+)", caption):
        return "size_relation" if m[2].endswith(" than") else "spatial_relation"
    return "attribute_count"


def test_caption_kind_names_the_form_of_every_caption_and_negative(small):
    texts = {text for row in rows(small["retrieval"], "train") for text in (*row["captions"], *row["negatives"])}
    kinds = Counter(caption_kind(text) for text in texts)
    assert set(kinds) == set(CAPTION_KINDS), kinds
    assert all(caption_kind(text) == kind_of(text) for text in texts)
    with pytest.raises(ValueError, match="not a caption of the scenes grammar: 'a cat on a mat'"):
        caption_kind("a cat on a mat")


@pytest.mark.slow
def test_compositional_split_holds_only_held_out_combinations(large):
    held_out = {tuple(c) for c in load_manifest(large["caption"])["metadata"]["held_out"]}
    assert held_out == held_out_combinations(0)
    per_shape = Counter(shape for shape, _ in held_out)
    per_color = Counter(color for _, color in held_out)
    assert set(per_shape) == set(SHAPES) and set(per_shape.values()) == {2} and max(per_color.values()) <= 2
    for split in SPLITS:
        for row in rows(large["caption"], split, ["captions"]):
            listing = re.fullmatch(r"from left to right: (.+)", row["captions"][0])[1]
            items = [parse_description(item) for item in re.split(r", | and ", listing)]
            combos = {(item["shape"], item["color"]) for item in items}
            assert bool(combos & held_out) == (split == "test_compositional"), (split, combos)


@pytest.mark.slow
def test_a_question_only_model_stays_near_chance(large):
    """Bound: a model that learns the majority answer on train per question type, or per question
    template (attribute words masked), scores on test at most chance + 10 points, where chance is one
    over the answers the type (or, for relate, the asked attribute) can have."""

    def questions(split):
        return [q for row in rows(large["vqa"], split, ["questions"]) for q in row["questions"]]

    def majority(keyed):
        counts = defaultdict(Counter)
        for key, answer in keyed:
            counts[key][answer] += 1
        return {key: c.most_common(1)[0][0] for key, c in counts.items()}

    train, test = questions("train"), questions("test")
    per_type = majority((q["question_type"], q["answers"][0]) for q in train)
    per_template = majority((template(q["question"]), q["answers"][0]) for q in train)
    for kind, chance in CHANCE.items():
        asked = [q for q in test if q["question_type"] == kind]
        assert len(asked) >= 150, kind
        chance = 1 / (8 if kind == "relate" else chance)  # relate asks "what color" (8) or "what shape" (7)
        type_accuracy = np.mean([q["answers"][0] == per_type[kind] for q in asked])
        template_accuracy = np.mean([q["answers"][0] == per_template.get(template(q["question"])) for q in asked])
        assert type_accuracy <= chance + 0.10, (kind, type_accuracy)
        assert template_accuracy <= chance + 0.10, (kind, template_accuracy)


def test_same_seed_same_shards_any_workers_other_seed_other_shards(tmp_path):
    def shas(paths):
        return {
            task: [s["sha256"] for e in load_manifest(path)["splits"].values() for s in e["shards"]]
            for task, path in paths.items()
        }

    first = shas(write_scenes(tmp_path / "a", num_images=40, seed=5, workers=1))
    assert shas(write_scenes(tmp_path / "b", num_images=40, seed=5, workers=2)) == first
    other = shas(write_scenes(tmp_path / "c", num_images=40, seed=6, workers=1))
    assert all(set(other[task]).isdisjoint(first[task]) for task in first)


def test_bad_arguments_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        write_scenes(tmp_path / "x", num_images=40, image_size=32)
    with pytest.raises(ValueError, match="num_images"):
        write_scenes(tmp_path / "x", num_images=10)
    with pytest.raises(ValueError, match="unknown split"):
        generate_scene(0, "training", seed=0)
    assert not (tmp_path / "x").exists()


def descriptions_of(obj: SceneObject) -> list[dict[str, str]]:
    """Every description that fits ``obj``: each non-empty set of its attributes."""
    keys = ("size", "color", "shape")
    return [{key: getattr(obj, key) for key in subset} for k in (1, 2, 3) for subset in itertools.combinations(keys, k)]


def one_word_apart(a: str, b: str) -> bool:
    """Whether two captions differ in one word (a count may also change a noun's plural ending)."""

    def words(text: str) -> list[str]:
        return [w[:-1] if w.endswith("s") else w for w in text.split()]

    a_words, b_words = words(a), words(b)
    return len(a_words) == len(b_words) and sum(x != y for x, y in zip(a_words, b_words, strict=True)) == 1

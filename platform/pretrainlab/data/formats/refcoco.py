"""RefCOCO / RefCOCO+ / RefCOCOg: refs JSON + COCO-style ``instances.json`` + images -> grounding rows.

``SRC`` is a folder holding ``instances.json`` and one ``refs*.json``, or a refs JSON file
with ``instances.json`` beside it. The official ``refs(unc).p`` is a pickle, which is
never loaded here: convert it to JSON once, with a Python you trust (see ``PICKLE_HINT``).
Images are read from ``IMAGES/<file_name>`` (``file_name`` from ``instances.json``), where
``IMAGES`` is ``--images`` (e.g. COCO's ``train2014/``) or else the source folder.

The split is each ref's ``split`` (``train``, ``val``, ``testA``, ``testB``, ``test``).
One row per image and split holds its refs (by ``ref_id``): the sentences' ``sent``
strings, the category name, and the annotation's box converted from COCO ``x, y, w, h``
to pixel ``x1, y1, x2, y2``. A box that leaves the image by at most ``BOX_TOLERANCE``
pixels (COCO rounding) is clipped to it; one further out, or empty, is a bad entry.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Any

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.formats.common import (
    BadEntry,
    BadInput,
    Entry,
    Row,
    Source,
    check_split,
    default_image_root,
    get,
    inside,
    json_list,
    load_json,
    read_image,
    text,
)

BOX_TOLERANCE = 1.0
PICKLE_HINT = (
    "refs pickles are not loaded (unpickling runs code); convert it to JSON once with a Python you trust: "
    "python -c \"import json, pickle, sys; json.dump(pickle.load(open(sys.argv[1], 'rb')), "
    "open(sys.argv[1][:-2] + '.json', 'w'))\" 'refs(unc).p'"
)


def convert_refcoco(src: Path, images: Path | None, bad: BadInput) -> Source:
    """Reads RefCOCO-style refs and instances into grounding entries.

    Args:
        src: the folder holding ``instances.json`` and one ``refs*.json``, or the refs JSON.
        images: the folder holding the images ``instances.json`` names; default the source folder.
        bad: where bad refs and images go.

    Raises:
        DatasetError: a ``.p`` refs file (with ``PICKLE_HINT``), no or several refs JSON
            files, or a file that is not JSON or lacks its lists.
    """
    refs_file = _refs_file(src)
    refs = load_json(refs_file)
    if not isinstance(refs, list):
        raise DatasetError(f"{refs_file}: expected a JSON list of refs, got {type(refs).__name__}")
    instances_file = refs_file.parent / "instances.json"
    instances = load_json(instances_file)
    categories: dict[int, str] = {}
    for category_id, category in _by_id(instances_file, instances, "categories", bad).items():
        with bad.entry(instances_file, f"category id {category_id}"):
            categories[category_id] = get(category, "name", str)
    image_info = _by_id(instances_file, instances, "images", bad)
    annotations = _by_id(instances_file, instances, "annotations", bad)

    rows: dict[tuple[str, int], list[Row]] = defaultdict(list)
    for i, ref in enumerate(refs):
        with bad.entry(refs_file, f"refs[{i}]"):
            split, image_id, record = _ref(ref, annotations, image_info, categories)
            rows[split, image_id].append(record)

    root = images or default_image_root(src)
    entries = []
    for (split, image_id), image_refs in sorted(rows.items()):
        image = image_info[image_id]
        image_refs.sort(key=lambda r: int(r["ref_id"]))
        load = partial(_row, root, image, image_refs)
        entries.append(Entry(str(refs_file), f"image_id {image_id}", split, image["file_name"], load))
    return Source(entries, metadata={"categories": [name for _, name in sorted(categories.items())]})


def _ref(
    ref: Any, annotations: dict[int, Any], image_info: dict[int, Any], categories: dict[int, str]
) -> tuple[str, int, Row]:
    """(split, image id, ``GROUNDING_REF`` record) of one ref; raises ``BadEntry``."""
    ref_id, image_id, ann_id = get(ref, "ref_id", int), get(ref, "image_id", int), get(ref, "ann_id", int)
    annotation = annotations.get(ann_id)
    if annotation is None or annotation.get("image_id") != image_id:
        raise BadEntry(f"ann_id {ann_id} is not an annotation of image_id {image_id} in instances.json")
    if image_id not in image_info:
        raise BadEntry(f"image_id {image_id} is not in instances.json")
    get(image_info[image_id], "file_name", str)  # checked here, read when the row loads
    category_id = ref.get("category_id", annotation.get("category_id"))
    if category_id is not None and (type(category_id) is not int or category_id not in categories):
        raise BadEntry(f"category_id {category_id!r} is not in instances.json's categories")
    expressions = [text(sentence, "sent") for sentence in get(ref, "sentences", list)]
    if not expressions:
        raise BadEntry(f"ref_id {ref_id} has no sentences")
    record = {
        "ref_id": str(ref_id),
        "expressions": expressions,
        "box": _box(get(annotation, "bbox", list), image_info[image_id]),
        "category": None if category_id is None else categories[category_id],
    }
    return check_split(get(ref, "split", str)), image_id, record


def _refs_file(src: Path) -> Path:
    if src.suffix == ".p":
        raise DatasetError(f"{src}: {PICKLE_HINT}")
    if src.is_file():
        return src
    if not src.is_dir():
        raise DatasetError(f"{src}: no such file or folder")
    found = sorted(src.glob("refs*.json"))
    if len(found) != 1:
        pickles = sorted(p.name for p in src.glob("refs*.p"))
        hint = f"; {pickles[0]}: {PICKLE_HINT}" if pickles and not found else ""
        raise DatasetError(f"{src}: expected one refs*.json, found {[p.name for p in found]}{hint}")
    return found[0]


def _by_id(file: Path, data: Any, key: str, bad: BadInput) -> dict[int, dict[str, Any]]:
    """id -> object for one of instances.json's lists; an object without an integer id is a bad entry."""
    out: dict[int, dict[str, Any]] = {}
    for i, item in enumerate(json_list(data, key, file)):
        with bad.entry(file, f"{key}[{i}]"):
            out[get(item, "id", int)] = item
    return out


def _box(bbox: list, image: dict[str, Any]) -> list[float]:
    """COCO ``x, y, w, h`` -> ``x1, y1, x2, y2`` inside the image (clipped within ``BOX_TOLERANCE``)."""
    width, height = get(image, "width", int), get(image, "height", int)
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise BadEntry(f"image size {str(width):.20}x{str(height):.20} in instances.json is not a positive size")
    if len(bbox) != 4 or not all(_finite(v) for v in bbox):
        raise BadEntry(f"bbox must be 4 finite numbers x, y, w, h, got {bbox!r:.80}")
    x, y, w, h = (float(v) for v in bbox)
    x1, y1, x2, y2 = x, y, x + w, y + h
    if w <= 0 or h <= 0 or min(x1, y1) < -BOX_TOLERANCE or x2 > width + BOX_TOLERANCE or y2 > height + BOX_TOLERANCE:
        raise BadEntry(f"bbox {bbox} is empty or outside the {width}x{height} image")
    return [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))]


def _finite(value: Any) -> bool:
    """A JSON number that is a finite float (not a bool, not an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _row(root: Path, image: dict[str, Any], refs: list[Row]) -> Row:
    fields = read_image(inside(root, image["file_name"], field="'file_name'"))
    if (fields["width"], fields["height"]) != (image["width"], image["height"]):
        raise BadEntry(
            f"image is {fields['width']}x{fields['height']}, instances.json says {image['width']}x{image['height']}"
        )
    return {**fields, "refs": refs}

"""COCO captions: ``annotations/captions_<set>.json`` + the ``<set>/`` image folder -> caption rows.

``SRC`` is the COCO root (every ``captions_*.json`` in it or in its ``annotations/``
folder is converted) or one captions JSON file. The split is the set name without its
year (``captions_val2017.json`` -> ``val``). Images are read from
``IMAGES/<set>/<file_name>``, where ``IMAGES`` is ``--images`` or else the COCO root.
One row per image holds all its captions (ordered by annotation id, whitespace trimmed).
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from pathlib import Path

from pretrainlab.data.formats.common import (
    BadEntry,
    BadInput,
    Entry,
    Row,
    Source,
    annotation_files,
    default_image_root,
    get,
    inside,
    json_list,
    load_json,
    read_image,
    split_of_set,
    text,
)


def convert_coco_captions(src: Path, images: Path | None, bad: BadInput) -> Source:
    """Reads COCO caption files into caption entries, one per image.

    Args:
        src: the COCO root or one ``captions_<set>.json``.
        images: the folder holding the ``<set>/`` image folders; default the COCO root.
        bad: where bad images and annotations go (missing file, unknown image id, ...).

    Raises:
        DatasetError: no captions file, or a file that is not JSON or lacks the
            ``images`` / ``annotations`` lists.
    """
    root = images or default_image_root(src)
    entries = []
    for file in annotation_files(src, "captions_*.json"):
        set_name = file.stem.removeprefix("captions_")
        data = load_json(file)
        file_names = _image_files(file, json_list(data, "images", file), bad)
        captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for i, annotation in enumerate(json_list(data, "annotations", file)):
            with bad.entry(file, f"annotations[{i}]"):
                image_id = get(annotation, "image_id", int)
                if image_id not in file_names:
                    raise BadEntry(f"image_id {image_id} is not in 'images'")
                captions[image_id].append((get(annotation, "id", int), text(annotation, "caption")))
        for image_id, file_name in sorted(file_names.items()):
            if not captions[image_id]:
                bad.report(file, f"image_id {image_id}", "no captions")
                continue
            texts = [caption for _, caption in sorted(captions[image_id])]
            source_id = f"{set_name}/{file_name}"
            load = partial(_row, root, set_name, file_name, texts)
            entries.append(Entry(str(file), f"image_id {image_id}", split_of_set(set_name), source_id, load))
    return Source(entries)


def _image_files(file: Path, images: list, bad: BadInput) -> dict[int, str]:
    file_names: dict[int, str] = {}
    for i, image in enumerate(images):
        with bad.entry(file, f"images[{i}]"):
            image_id = get(image, "id", int)
            if image_id in file_names:
                raise BadEntry(f"image id {image_id} appears twice")
            file_names[image_id] = get(image, "file_name", str)
    return file_names


def _row(root: Path, set_name: str, file_name: str, captions: list[str]) -> Row:
    return {**read_image(inside(root, set_name, file_name, field="'file_name'")), "captions": captions}

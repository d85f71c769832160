"""Karpathy split JSON (``dataset_coco.json``, ``dataset_flickr30k.json``) + images -> retrieval rows.

``SRC`` is the JSON file, or a folder holding exactly one ``dataset_*.json``. Each entry
of ``images`` gives ``filepath`` (COCO only), ``filename``, ``split`` (``train``, ``val``,
``test``, or ``restval``, which goes to ``train``) and ``sentences[].raw``. Images are read
from ``IMAGES/<filepath>/<filename>``, where ``IMAGES`` is ``--images`` (e.g. the COCO
root, or Flickr30k's ``flickr30k-images/``) or else the JSON's folder. ``negatives`` is
empty: these sets have no hard-negative captions.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.formats.common import (
    BadEntry,
    BadInput,
    Entry,
    Row,
    Source,
    default_image_root,
    get,
    inside,
    json_list,
    load_json,
    read_image,
    text,
)

SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def convert_karpathy(src: Path, images: Path | None, bad: BadInput) -> Source:
    """Reads a Karpathy split JSON into retrieval entries, one per image.

    Args:
        src: the JSON file or the folder holding it.
        images: the image root the JSON's paths are relative to; default the JSON's folder.
        bad: where bad images and entries go.

    Raises:
        DatasetError: no single ``dataset_*.json``, or a file that is not JSON or lacks ``images``.
    """
    file = _json_file(src)
    root = images or default_image_root(file)
    found = []
    for i, image in enumerate(json_list(load_json(file), "images", file)):
        with bad.entry(file, f"images[{i}]"):
            name = get(image, "filename", str)
            parts = (get(image, "filepath", str), name) if "filepath" in image else (name,)
            split = get(image, "split", str)
            if split not in SPLITS:
                raise BadEntry(f"split {split!r} is not one of {', '.join(SPLITS)}")
            captions = [text(sentence, "raw") for sentence in get(image, "sentences", list)]
            if not captions:
                raise BadEntry(f"{'/'.join(parts)}: no sentences")
            found.append((SPLITS[split], "/".join(parts), i, parts, captions))
    entries = [
        Entry(str(file), f"images[{i}]", split, relative, partial(_row, root, parts, captions))
        for split, relative, i, parts, captions in sorted(found)
    ]
    return Source(entries)


def _json_file(src: Path) -> Path:
    if src.is_file():
        return src
    found = sorted(src.glob("dataset_*.json")) if src.is_dir() else []
    if len(found) != 1:
        raise DatasetError(f"{src}: expected one dataset_*.json file, found {[p.name for p in found]}")
    return found[0]


def _row(root: Path, parts: tuple[str, ...], captions: list[str]) -> Row:
    field = "'filepath' + 'filename'" if len(parts) == 2 else "'filename'"
    return {**read_image(inside(root, *parts, field=field)), "captions": captions, "negatives": [], "also_true": []}

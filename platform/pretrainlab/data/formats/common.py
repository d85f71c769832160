"""What every source format shares: entries, bad-input handling, image and JSON reading.

A converter scans its source into a ``Source``: a deterministic list of ``Entry``
objects, each of which loads one row lazily. Every problem with one entry (an
unreadable or truncated image, a missing file, a path that escapes the source, a label
out of range, a malformed JSON entry) is raised as ``BadEntry`` inside a
``BadInput.entry`` block, which either stops the conversion with a ``DatasetError``
naming the file and the entry, or (``skip_bad``) records it and goes on. Problems with
a whole file (missing, not JSON, wrong top-level layout) always stop the conversion.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pretrainlab.data.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Pillow mode -> channels stored in the row (the reader converts PNG/JPEG to L, RGB or RGBA).
_CHANNELS = {"1": 1, "L": 1, "P": 3, "RGB": 3, "YCbCr": 3, "CMYK": 3, "LA": 4, "PA": 4, "RGBA": 4}
# Pillow format -> image_format; MPO is a camera JPEG with extra frames (the first is decoded).
_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg"}
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")  # a part of shard file names
# Without classes.txt, the classes are "0" .. the largest label; more need a classes.txt.
MAX_NUMBERED_CLASSES = 100_000
NUMBERED_CLASSES_FROM = f"the largest label below {MAX_NUMBERED_CLASSES}; more classes need a classes.txt"

Row = dict[str, Any]


class BadEntry(Exception):
    """One entry of a source is unusable; the message says why (``BadInput`` adds file and entry)."""


@dataclass(frozen=True)
class Entry:
    """One future row: where it comes from, and how to load it.

    Attributes:
        file: the file that holds the entry (the image itself, a list file, a JSON file).
        key: where in that file ("line 3", "image_id 42"); empty when the file is the entry.
        split: the split the row goes to.
        source_id: the row's ``source_id`` (image path relative to the source, or ``file:index``).
        load: reads the image and returns the row's other fields; raises ``BadEntry``.
    """

    file: str
    key: str
    split: str
    source_id: str
    load: Callable[[], Row]


@dataclass(frozen=True)
class Source:
    """What a converter found: entries in a deterministic order, and dataset-level facts.

    Attributes:
        entries: one per row to write.
        class_names: label id -> name (classification); empty for image-text sets.
        metadata: JSON-serialisable facts for the manifest (e.g. grounding ``categories``).
    """

    entries: list[Entry]
    class_names: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


class BadInput:
    """Stops at the first bad entry, or (``skip_bad``) records every bad entry and goes on.

    Attributes:
        skip_bad: record and skip bad entries instead of raising.
        skipped: one ``{"file", "entry", "reason"}`` dict per skipped entry, in order.
    """

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.skipped: list[dict[str, str]] = []

    def report(self, file: str | os.PathLike, key: str, reason: str) -> None:
        """Raises a ``DatasetError`` naming file and entry, or records the entry as skipped."""
        if not self.skip_bad:
            where = f"{file} ({key})" if key else str(file)
            raise DatasetError(f"{where}: {reason} (pass --skip-bad to skip bad entries)")
        self.skipped.append({"file": str(file), "entry": key, "reason": reason})

    @contextmanager
    def entry(self, file: str | os.PathLike, key: str) -> Iterator[None]:
        """Runs the block for one entry; a ``BadEntry`` in it is reported (and then suppressed)."""
        try:
            yield
        except BadEntry as e:
            self.report(file, key, str(e))


def read_image(path: Path) -> Row:
    """Reads a PNG or JPEG file into the image fields of a row, bytes kept as they are.

    Raises:
        BadEntry: naming ``path``, when it is missing, unreadable, not PNG/JPEG, truncated,
            not 8-bit, or larger than Pillow's ``Image.MAX_IMAGE_PIXELS`` (decompression bomb).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadEntry(f"image {path}: file not found") from None
    except (OSError, ValueError) as e:  # ValueError: a name that is not a valid path
        raise BadEntry(f"image {path}: cannot read ({e})") from None
    try:
        return image_fields(data)
    except BadEntry as e:
        raise BadEntry(f"image {path}: {e}") from None


def image_fields(data: bytes) -> Row:
    """Checks encoded PNG/JPEG bytes by decoding them fully; returns the row's image fields.

    Raises:
        BadEntry: the bytes are not a complete 8-bit PNG or JPEG image, or hold more
            pixels than ``Image.MAX_IMAGE_PIXELS``.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as image:
                image.load()  # a full decode: catches truncated and corrupt files
                image_format, mode, (width, height) = image.format, image.mode, image.size
                transparent = "transparency" in image.info
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadEntry(f"refused as a decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise BadEntry("not a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadEntry(f"not a complete PNG or JPEG image ({e})") from None
    if mode not in _CHANNELS:
        raise BadEntry(f"pixel mode {mode!r} is not 8-bit grey, RGB or RGBA")
    channels = 4 if mode == "P" and transparent else _CHANNELS[mode]
    return {
        "image": data,
        "image_format": _FORMATS[image_format],
        "height": height,
        "width": width,
        "channels": channels,
    }


def raw_image_fields(pixels: np.ndarray) -> Row:
    """The image fields of a row for uint8 pixels H x W x C, stored raw."""
    height, width, channels = pixels.shape
    return {
        "image": np.ascontiguousarray(pixels, np.uint8).tobytes(),
        "image_format": "raw",
        "height": height,
        "width": width,
        "channels": channels,
    }


def inside(root: Path, *parts: str, field: str | None = None) -> Path:
    """``root / parts[0] / parts[1] ...``, refusing paths that leave ``root``, as written or through a link.

    Refused: an absolute part, ``..`` climbing above ``root``, and a path that resolves
    outside ``root`` through a symbolic link (links that stay inside ``root`` are fine, and
    ``root`` itself may be a link).

    Args:
        root: the folder the path is relative to (SRC, or ``--images``).
        parts: the path as the source gives it, e.g. a folder and a file name.
        field: the annotation field(s) holding the path, named in the error.

    Raises:
        BadEntry: a part is empty, holds a NUL character, or the path leaves ``root``.
    """
    relative, named = "/".join(parts), f" (field {field})" if field else ""
    if not all(parts):
        raise BadEntry(f"empty image path {relative!r}{named}")
    if "\x00" in relative:
        raise BadEntry(f"path {relative!r} holds a NUL character{named}")
    normal = os.path.normpath(relative)
    if any(os.path.isabs(part) for part in parts) or normal == ".." or normal.startswith(".." + os.sep):
        raise BadEntry(f"path {relative!r} escapes the source folder {root}{named}")
    path = root / normal
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise BadEntry(f"path {relative!r} escapes the source folder {root} through a symbolic link to {real}{named}")
    return path


def load_json(path: Path) -> Any:
    """Parses a JSON file.

    Raises:
        DatasetError: naming the file, and the line and column of a syntax error.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None


def json_list(data: Any, key: str, path: Path) -> list[Any]:
    """``data[key]`` of a JSON file's top-level object, which must be a list.

    Raises:
        DatasetError: naming the file, when the top level is not an object or the key is
            missing or not a list.
    """
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise DatasetError(f"{path}: expected a top-level object with a list {key!r}")
    return value


def get(obj: Any, key: str, kind: type | tuple[type, ...]) -> Any:
    """``obj[key]`` of one JSON entry, checked to be of ``kind`` (a bool is not an int).

    Raises:
        BadEntry: ``obj`` is not an object, or the key is missing or of another type.
    """
    if not isinstance(obj, dict):
        raise BadEntry(f"expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise BadEntry(f"missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadEntry(f"{key!r} must be {names}, got {value!r:.60}")
    if isinstance(value, str):
        check_text(value, repr(key))
    return value


def check_text(value: str, what: str) -> str:
    """Returns ``value`` when it can be stored as UTF-8 (JSON strings and file names may hold
    lone surrogates, which cannot).

    Raises:
        BadEntry: naming ``what`` (e.g. ``'caption'``).
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadEntry(f"{what} holds a character that is not valid Unicode text: {value!r:.60}") from None
    return value


def text(obj: Any, key: str) -> str:
    """``obj[key]`` as a string with surrounding whitespace removed, which must not be empty.

    Raises:
        BadEntry: missing, not a string, or blank.
    """
    value = get(obj, key, str).strip()
    if not value:
        raise BadEntry(f"{key!r} is empty")
    return value


def split_of_set(set_name: str) -> str:
    """The split of an official set name: ``train2017`` -> ``train``, ``val2014`` -> ``val``."""
    return re.sub(r"\d+$", "", set_name)


def check_split(split: str) -> str:
    """Returns ``split`` when it is a valid split name (1-64 letters, digits, ``_``).

    Raises:
        BadEntry: otherwise.
    """
    if not _SPLIT_NAME.fullmatch(split):
        raise BadEntry(f"split {split!r:.80} is not a valid split name (at most 64 letters, digits and '_')")
    return split


def class_names_file(folder: Path) -> list[str] | None:
    """The class names in ``folder/classes.txt`` (one per line, blank lines ignored), or None.

    Raises:
        DatasetError: the file cannot be read or repeats a name.
    """
    path = folder / "classes.txt"
    if not path.is_file():
        return None
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise DatasetError(f"{path}: class names must be distinct; repeated: {repeated}")
    return names


def numbered_classes(largest: int) -> tuple[list[str], str]:
    """Class names ``"0" .. str(largest)`` for a source without ``classes.txt``, and where they come from.

    ``largest`` is the largest label below ``MAX_NUMBERED_CLASSES``; larger labels are then
    out of range (bad entries) rather than a list of billions of names.
    """
    return [str(i) for i in range(largest + 1)], NUMBERED_CLASSES_FROM


def check_label(label: int, num_classes: int, classes_from: str) -> int:
    """Returns ``label`` when it indexes ``num_classes`` classes.

    Raises:
        BadEntry: naming the label and where the classes came from.
    """
    if not 0 <= label < num_classes:
        raise BadEntry(f"label {label} not in [0, {num_classes}) ({num_classes} classes from {classes_from})")
    return label


def default_image_root(src: Path) -> Path:
    """Where an annotation source's images are by default: the source folder (for a file,
    its folder, or that folder's parent when it is COCO's ``annotations/``)."""
    if src.is_dir():
        return src
    return src.parent.parent if src.parent.name == "annotations" else src.parent


def annotation_files(src: Path, pattern: str) -> list[Path]:
    """The annotation JSON files of a source: ``src`` itself, or those matching ``pattern``
    in the folder ``src`` and its ``annotations/`` subfolder, sorted.

    Raises:
        DatasetError: ``src`` does not exist, or is a folder without a matching file.
    """
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise DatasetError(f"{src}: no such file or folder")
    files = sorted([*src.glob(pattern), *(src / "annotations").glob(pattern)])
    if not files:
        raise DatasetError(f"{src}: no {pattern} file here or in {src / 'annotations'}")
    return files


def answer_vocab(rows: list[Row]) -> list[str]:
    """Every annotator answer of VQA rows, most frequent first (ties alphabetical)."""
    counts = Counter(answer for row in rows for question in row["questions"] for answer in question["answers"])
    return sorted(counts, key=lambda answer: (-counts[answer], answer))


Converter = Callable[[Path, Path | None, BadInput], Source]
"""``(src, images, bad) -> Source``: ``images`` is ``--images`` (None for the default place)."""

"""Annotation list files: one ``relative/path [label]`` per line.

``SRC`` is one list file (split ``train``; ``--split`` renames it) or a folder of list
files, one per split, named ``<split>.txt`` (``classes.txt`` excluded). Paths are
relative to the list file's folder, may not leave it (as written or through a symbolic
link) and may not contain spaces; blank lines and lines starting with ``#`` are ignored.
A line without a label is an unlabelled image (null label). Class names come from
``classes.txt`` next to the list files (one per line), or else are ``"0" .. str(max
label)`` (labels up to 99,999; larger ones are bad entries).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.formats.common import (
    MAX_NUMBERED_CLASSES,
    BadEntry,
    BadInput,
    Entry,
    Row,
    Source,
    check_label,
    class_names_file,
    inside,
    numbered_classes,
    read_image,
)


@dataclass(frozen=True)
class _Line:
    file: Path
    number: int
    split: str
    path: str
    label: int | None


def convert_listfile(src: Path, images: Path | None, bad: BadInput) -> Source:
    """Reads list files into classification entries.

    Args:
        src: a list file, or a folder of ``<split>.txt`` list files.
        images: unused (must be None): paths are relative to the list file's folder.
        bad: where bad lines go.

    Raises:
        DatasetError: ``src`` is missing or holds no list file, a list file is unreadable,
            or ``classes.txt`` is malformed.
    """
    if src.is_dir():
        files = sorted(p for p in src.glob("*.txt") if p.name != "classes.txt")
        if not files:
            raise DatasetError(f"{src}: no <split>.txt list files in this folder")
        folder = src
    elif src.is_file():
        files, folder = [src], src.parent
    else:
        raise DatasetError(f"{src}: no such file or folder")

    lines = [line for file in files for line in _parse(file, "train" if src.is_file() else file.stem, bad)]
    names = class_names_file(folder)
    if names is None:
        labels = (line.label for line in lines if line.label is not None and line.label < MAX_NUMBERED_CLASSES)
        names, classes_from = numbered_classes(max(labels, default=-1))
    else:
        classes_from = str(folder / "classes.txt")
    entries = [
        Entry(
            str(line.file),
            f"line {line.number}",
            line.split,
            line.path,
            partial(_row, folder, line.path, line.label, len(names), classes_from),
        )
        for line in lines
    ]
    return Source(entries, names)


def _parse(file: Path, split: str, bad: BadInput) -> list[_Line]:
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{file}: cannot read ({e})") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        with bad.entry(file, f"line {number}"):
            if len(fields) > 2:
                raise BadEntry(f"expected 'path [label]', got {len(fields)} fields: {raw.strip()!r:.80}")
            label = None
            if len(fields) == 2:
                try:
                    label = int(fields[1])
                except ValueError:
                    raise BadEntry(f"label {fields[1]!r} is not an integer") from None
            lines.append(_Line(file, number, split, fields[0], label))
    return lines


def _row(folder: Path, path: str, label: int | None, num_classes: int, classes_from: str) -> Row:
    if label is not None:
        check_label(label, num_classes, classes_from)
    return {**read_image(inside(folder, path)), "label": label}

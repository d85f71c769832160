"""ImageFolder: ``SRC/<split>/<class>/*.png|jpg``, or ``SRC/<class>/*`` for one split (``train``).

The layout has split folders when any folder in ``SRC`` holds a folder. Class names are
the class folder names of all splits, sorted; a split may lack some classes. Image bytes
are kept as they are. Hidden files and folders (name starting with ``.``) are ignored;
any other file that is not a ``.png``/``.jpg``/``.jpeg`` image inside a class folder is
a bad entry, and so is a file that a symbolic link leads to outside ``SRC``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pretrainlab.data.errors import DatasetError
from pretrainlab.data.formats.common import (
    IMAGE_SUFFIXES,
    BadEntry,
    BadInput,
    Entry,
    Row,
    Source,
    check_text,
    image_fields,
    inside,
)


def convert_imagefolder(src: Path, images: Path | None, bad: BadInput) -> Source:
    """Scans an ImageFolder tree into classification entries.

    Args:
        src: the root folder.
        images: unused (must be None): the images are the tree itself.
        bad: where bad entries go.

    Raises:
        DatasetError: ``src`` is not a folder.
    """
    if not src.is_dir():
        raise DatasetError(f"{src}: not a folder (imagefolder wants SRC/<split>/<class>/*.png or SRC/<class>/*.png)")
    children = _visible(src)
    has_splits = any(_visible(child, dirs=True) for child in children if child.is_dir())
    split_dirs = {child.name: child for child in children if child.is_dir()} if has_splits else {"train": src}
    for child in children if has_splits else []:
        if not child.is_dir():
            bad.report(child, "", "a file among split folders (expected SRC/<split>/<class>/*.png)")

    class_names = sorted({d.name for folder in split_dirs.values() for d in _visible(folder, dirs=True)})
    entries = []
    for split, folder in sorted(split_dirs.items()):
        for child in _visible(folder):
            if not child.is_dir():
                bad.report(child, "", "not inside a class folder")
                continue
            for path in _visible(child):
                source_id = path.relative_to(src).as_posix()
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    load = partial(_row, src, source_id, class_names.index(child.name))
                    entries.append(Entry(str(path), "", split, source_id, load))
                else:
                    bad.report(path, "", f"not a {'/'.join(IMAGE_SUFFIXES)} file")
    return Source(entries, class_names)


def _visible(folder: Path, dirs: bool = False) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p.is_dir() or not dirs))


def _row(src: Path, relative: str, label: int) -> Row:
    check_text(relative, "the path")
    path = inside(src, relative)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadEntry(f"cannot read ({e})") from None
    return {**image_fields(data), "label": label}

"""VQAv2: questions JSON + annotations JSON + COCO images -> vqa rows, one per image.

``SRC`` is a folder holding ``*questions*.json`` and ``*annotations*.json`` (there or in
its ``annotations/`` folder), or one questions JSON with its annotations JSON beside it.
Files pair up by their ``data_subtype`` (``train2014``), whose name without the year is
the split. Images are read from ``IMAGES/<subtype>/COCO_<subtype>_<image_id:012d>.jpg``,
where ``IMAGES`` is ``--images`` or else the source folder. Each question keeps all its
annotators' answers (repeats included, for the VQA soft score) and its question type.
"""

from __future__ import annotations

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


def convert_vqav2(src: Path, images: Path | None, bad: BadInput) -> Source:
    """Reads VQAv2 question/annotation pairs into vqa entries.

    Args:
        src: the folder of VQAv2 JSON files, or one questions JSON.
        images: the folder holding the ``<subtype>/`` COCO image folders; default the source folder.
        bad: where bad questions, annotations and images go, and questions files
            without a matching annotations file (e.g. the test set, which has no answers).

    Raises:
        DatasetError: no questions file, a file that is not JSON or lacks its lists or
            ``data_subtype``.
    """
    root = images or default_image_root(src)
    question_files = annotation_files(src, "*questions*.json")
    folder = src if src.is_dir() else src.parent
    annotations = {}
    for file in annotation_files(folder, "*annotations*.json"):
        data = load_json(file)
        annotations[_subtype(data, file)] = (file, data)
    entries = []
    for file in question_files:
        data = load_json(file)
        subtype = _subtype(data, file)
        if subtype not in annotations:
            bad.report(file, "", f"no annotations JSON with data_subtype {subtype!r}; questions need answers")
            continue
        answers = _answers(*annotations[subtype], bad)
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for i, question in enumerate(json_list(data, "questions", file)):
            with bad.entry(file, f"questions[{i}]"):
                question_id = get(question, "question_id", int)
                if question_id not in answers:
                    raise BadEntry(f"question_id {question_id} has no annotation in {annotations[subtype][0].name}")
                record = {"question_id": str(question_id), "question": text(question, "question")}
                by_image[get(question, "image_id", int)].append({**record, **answers.pop(question_id)})
        for question_id in sorted(answers):
            bad.report(annotations[subtype][0], f"question_id {question_id}", f"no such question in {file.name}")
        for image_id, questions in sorted(by_image.items()):
            name = f"COCO_{subtype}_{image_id:012d}.jpg"
            questions.sort(key=lambda q: int(q["question_id"]))
            load = partial(_row, root, subtype, name, questions)
            entries.append(Entry(str(file), f"image_id {image_id}", split_of_set(subtype), f"{subtype}/{name}", load))
    return Source(entries)


def _subtype(data: Any, file: Path) -> str:
    subtype = data.get("data_subtype") if isinstance(data, dict) else None
    if not isinstance(subtype, str) or not subtype.isalnum():
        raise DatasetError(f"{file}: expected a top-level 'data_subtype' such as 'train2014', got {subtype!r}")
    return subtype


def _answers(file: Path, data: Any, bad: BadInput) -> dict[int, dict[str, Any]]:
    """question_id -> {"answers": [...], "question_type": ...} from one annotations JSON."""
    answers = {}
    for i, annotation in enumerate(json_list(data, "annotations", file)):
        with bad.entry(file, f"annotations[{i}]"):
            question_id = get(annotation, "question_id", int)
            if question_id in answers:
                raise BadEntry(f"question_id {question_id} is annotated twice")
            texts = [text(answer, "answer") for answer in get(annotation, "answers", list)]
            if not texts:
                raise BadEntry(f"question_id {question_id}: 'answers' is empty")
            question_type = annotation.get("question_type")
            if question_type is not None:
                question_type = get(annotation, "question_type", str)
            answers[question_id] = {"answers": texts, "question_type": question_type}
    return answers


def _row(root: Path, subtype: str, name: str, questions: list[dict[str, Any]]) -> Row:
    return {**read_image(inside(root, subtype, name, field="'image_id'")), "questions": questions}

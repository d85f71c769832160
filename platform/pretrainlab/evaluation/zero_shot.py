"""Zero-shot classification by an image-text model: each class's name in a prompt, the nearest prompt wins.

Two kinds of labelled images: a classification dataset (whole images, its class names) and a
grounding dataset (each referred object cut out by its box, labelled by its category, e.g. the
shape of a scenes object).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pretrainlab.data.dataset import load_split_annotated, load_split_numpy
from pretrainlab.data.errors import DatasetError
from pretrainlab.data.shards import load_manifest
from pretrainlab.inference.inferencers import ImageTextInferencer


@dataclass
class LabelledImages:
    """Images (uint8 ``H x W x C`` each, sizes may differ), their labels and the class names."""

    images: list[np.ndarray]
    labels: np.ndarray
    class_names: list[str]


def labelled_images(folder: str | os.PathLike, split: str, classes: Sequence[str] | None = None) -> LabelledImages:
    """The labelled images of a classification or grounding dataset's split, kept to ``classes`` when given.

    Raises:
        DatasetError: a dataset of another task, or a class name it does not have.
    """
    manifest = load_manifest(folder)
    if manifest["task"] == "classification":
        images, labels = load_split_numpy(folder, split)
        pictures, names = list(images.transpose(0, 2, 3, 1)), list(manifest["class_names"])
    elif manifest["task"] == "grounding":
        names = list(manifest["metadata"]["categories"])
        pictures, label_list = [], []
        images, annotations = load_split_annotated(folder, split)
        for image, refs in zip(images.transpose(0, 2, 3, 1), annotations["refs"], strict=True):
            for ref in refs:
                x1, y1, x2, y2 = (round(v) for v in ref["box"])
                pictures.append(np.ascontiguousarray(image[y1:y2, x1:x2]))
                label_list.append(names.index(ref["category"]))
        labels = np.asarray(label_list, dtype=np.int64)
    else:
        raise DatasetError(
            f"{folder}: zero-shot classification needs a classification or grounding dataset, "
            f"not a {manifest['task']} one"
        )
    if classes is None:
        return LabelledImages(pictures, labels, names)
    unknown = [name for name in classes if name not in names]
    if unknown:
        raise DatasetError(f"{folder}: no class named {', '.join(map(repr, unknown))}; classes: {', '.join(names)}")
    wanted = [names.index(name) for name in classes]
    keep = np.flatnonzero(np.isin(labels, wanted))
    remap = {old: new for new, old in enumerate(wanted)}
    return LabelledImages([pictures[i] for i in keep], np.array([remap[int(labels[i])] for i in keep]), list(classes))


def zero_shot_top1(
    inferencer: ImageTextInferencer, data: LabelledImages, template: str = "a {}", batch_size: int = 64
) -> dict[str, float]:
    """Top-1 in percent of the prompts ``template.format(class name, lower-cased)``, and the chance level."""
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no {{}} for the class name")
    prompts = [template.format(name.lower()) for name in data.class_names]
    results = inferencer(data.images, texts=prompts, batch_size=batch_size)
    predictions = np.array([result["pred_index"] for result in results])
    return {"top1": 100.0 * float(np.mean(predictions == data.labels)), "chance": 100.0 / len(prompts)}

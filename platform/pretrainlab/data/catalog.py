"""Find the prepared shard folder an experiment reads, and what the train loop needs to know about it."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from pretrainlab.config import ExperimentConfig
from pretrainlab.data.builtin import BUILTIN_DATASETS, SCENES, prepare_builtin, prepare_scenes
from pretrainlab.data.shards import MANIFEST_FILE, SCHEMAS, load_manifest, shard_paths
from pretrainlab.paths import resolve
from pretrainlab.storage import join, open_input

SCENES_TASKS = tuple(task for task in SCHEMAS if task != "classification")
"""The datasets of the scenes set: one per image-text task."""


def is_builtin(name: str) -> bool:
    """Whether ``data.dataset`` names a built-in dataset (prepared under ``data.root``) rather than a folder."""
    family, _, task = name.partition("/")
    return name in BUILTIN_DATASETS or (family == SCENES and task in SCENES_TASKS)


def dataset_dir(cfg: ExperimentConfig) -> str:
    """The prepared shard folder of ``cfg.data.dataset``, converting a built-in set on first use.

    Built-in names: ``fmnist``, ``digits`` and ``scenes/<task>`` (``caption``, ``vqa``, ``grounding``,
    ``retrieval``: the generated image-text set). Anything else is a folder path.
    """
    name, root = cfg.data.dataset, resolve(cfg.data.root)
    if name in BUILTIN_DATASETS:
        prepare_builtin(name, root, seed=cfg.runtime.seed)
    elif is_builtin(name):
        prepare_scenes(root, seed=cfg.runtime.seed)
    return dataset_location(cfg)


def dataset_location(cfg: ExperimentConfig) -> str:
    """Where ``cfg.data.dataset`` is, or would be, prepared: a folder or a URI. Unlike :func:`dataset_dir` it
    converts nothing."""
    name = cfg.data.dataset
    return join(resolve(cfg.data.root), name) if is_builtin(name) else resolve(name)


def prepared_location(cfg: ExperimentConfig) -> str | None:
    """:func:`dataset_location` when a prepared dataset is there (it has a ``manifest.json``), else None."""
    location = dataset_location(cfg)
    try:
        with open_input(join(location, MANIFEST_FILE)):
            return location
    except (FileNotFoundError, NotADirectoryError):
        return None


def dataset_info(folder: str) -> dict[str, Any]:
    """Task, class names, input channels and training-set size of a prepared dataset."""
    manifest = load_manifest(folder)
    first_shard = shard_paths(folder, "train")[0]
    channels = pq.ParquetFile(first_shard).read_row_group(0, columns=["channels"]).column(0)[0].as_py()
    return {
        "task": manifest["task"],
        "class_names": manifest["class_names"],
        "num_classes": len(manifest["class_names"]),
        "in_chans": int(channels),
        "train_count": manifest["splits"]["train"]["count"],
    }

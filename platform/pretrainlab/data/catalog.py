"""Find the prepared shard folder an experiment reads, and what the train loop needs to know about it."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from pretrainlab.config import ExperimentConfig
from pretrainlab.data.builtin import BUILTIN_DATASETS, prepare_builtin
from pretrainlab.data.shards import load_manifest, shard_paths
from pretrainlab.paths import resolve


def dataset_dir(cfg: ExperimentConfig) -> str:
    """The prepared shard folder of ``cfg.data.dataset``, converting a built-in set on first use."""
    name = cfg.data.dataset
    if name in BUILTIN_DATASETS:
        return str(prepare_builtin(name, resolve(cfg.data.root), seed=cfg.runtime.seed))
    return resolve(name)


def dataset_info(folder: str) -> dict[str, Any]:
    """Class names, input channels and training-set size of a prepared classification dataset."""
    manifest = load_manifest(folder)
    first_shard = shard_paths(folder, "train")[0]
    channels = pq.ParquetFile(first_shard).read_row_group(0, columns=["channels"]).column(0)[0].as_py()
    return {
        "class_names": manifest["class_names"],
        "num_classes": len(manifest["class_names"]),
        "in_chans": int(channels),
        "train_count": manifest["splits"]["train"]["count"],
    }

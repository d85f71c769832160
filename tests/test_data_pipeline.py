"""The Ray Data pipeline under Ray Train: 2 workers get disjoint parts of every epoch that cover the whole set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import ray.train
from ray import cloudpickle
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from pretrainlab.config import validate
from pretrainlab.data.pipeline import Preprocessor, training_batches
from pretrainlab.data.shards import raw_classification_table, write_dataset
from pretrainlab.train.trainer import build_datasets

pytestmark = pytest.mark.needs_ray

ROWS = 96
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module


@pytest.fixture(scope="module", autouse=True)
def _ray(local_ray):
    return local_ray


@pytest.fixture
def dataset(tmp_path) -> str:
    """Images whose first pixel is their row number, so a worker can tell which rows it saw."""
    images = np.zeros((ROWS, 4, 4, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(ROWS)
    splits = {
        split: raw_classification_table(
            images, np.arange(ROWS) % 10, split=split, source_ids=[f"{split}:{i}" for i in range(ROWS)]
        )
        for split in ("train", "val")
    }
    write_dataset(
        tmp_path / "ids", splits, name="ids", task="classification", class_names=list("0123456789"), shard_size=40
    )
    return str(tmp_path / "ids")


def record_rows(config: dict) -> None:
    cfg = validate(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    augment = Preprocessor(cfg.data, train=True) if cfg.data.augment_on == "worker" else None
    for epoch in range(2):
        seen = []
        for rows in training_batches(ray.train.get_dataset_shard("train"), cfg, epoch):
            batch = augment(rows) if augment else rows
            seen += batch["image"][:, 0, 0, 0].tolist()
        Path(config["out"], f"epoch{epoch}-rank{rank}.json").write_text(json.dumps(seen))
        ray.train.report({"epoch": epoch})


@pytest.mark.parametrize("augment_on", ["worker", "ray_data"])
def test_two_workers_split_every_epoch_disjointly_and_completely(dataset, tmp_path, augment_on):
    cfg = validate(
        {
            "name": "ids",
            "data": {"dataset": dataset, "augment_on": augment_on, "shuffle_buffer_rows": 32, "ray_data_cpus": 0.5},
            "train": {"batch_size": 8, "num_workers": 2},
        }
    )
    out = tmp_path / "seen"
    out.mkdir()
    trainer = TorchTrainer(
        record_rows,
        train_loop_config={"cfg": cfg.to_dict(), "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=f"ids-{augment_on}", storage_path=str(tmp_path / "runs")),
        datasets=build_datasets(cfg, dataset),
    )
    trainer.fit()
    orders = {}
    for epoch in range(2):
        parts = [json.loads((out / f"epoch{epoch}-rank{rank}.json").read_text()) for rank in range(2)]
        assert len(parts[0]) == len(parts[1]) == ROWS // 2
        assert set(parts[0]).isdisjoint(parts[1])
        assert set(parts[0]) | set(parts[1]) == set(range(ROWS))
        orders[epoch] = parts[0] + parts[1]
    assert orders[0] != orders[1], "each epoch is shuffled anew"

"""Build the ``TorchTrainer`` for an experiment: the one entry point shared by jobs and sweeps."""

from __future__ import annotations

import ray
from ray.data import DataContext
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback, WorkerGroupError
from ray.train.torch import TorchTrainer

from pretrainlab.config import ExperimentConfig
from pretrainlab.data.catalog import dataset_dir, dataset_info
from pretrainlab.data.dataset import read_split
from pretrainlab.data.errors import DatasetError
from pretrainlab.data.pipeline import augment_in_ray_data, batch_blocks
from pretrainlab.data.transforms import PipelineError, eval_pipeline, train_views
from pretrainlab.models.backbones import BackboneError
from pretrainlab.models.interop import InteropError
from pretrainlab.paths import MLFLOW_SCHEMES, resolve
from pretrainlab.storage import StorageError, check_storage
from pretrainlab.strategies import get_strategy
from pretrainlab.train.loop import TrainingDiverged, train_loop_per_worker

TRAIN_SPLITS = ("train", "val")
EXPERIMENT_ERRORS = (DatasetError, BackboneError, InteropError, PipelineError, StorageError)
"""What :func:`check_experiment` raises; each message names the file, key or value at fault."""


def divergence(error: BaseException) -> TrainingDiverged | None:
    """The ``TrainingDiverged`` of a worker when ``error`` (from ``TorchTrainer.fit``) comes from one, else None."""
    failures = error.worker_failures.values() if isinstance(error, WorkerGroupError) else ()
    return next((failure for failure in failures if isinstance(failure, TrainingDiverged)), None)


def wants_gpu(cfg: ExperimentConfig) -> bool:
    """``train.use_gpu``, with ``auto`` meaning: the Ray cluster has GPUs."""
    if cfg.train.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.train.use_gpu)


def check_experiment(cfg: ExperimentConfig) -> str:
    """Everything that can fail before Ray starts: the storage buckets, the dataset, the model and the pipelines.

    Returns:
        The prepared dataset folder.

    Raises:
        One of :data:`EXPERIMENT_ERRORS`.
    """
    check_storage(cfg.train.storage_path, "train.storage_path")
    data_folder = dataset_dir(cfg)
    check_storage(data_folder, "data.dataset")
    info = dataset_info(data_folder)
    strategy = get_strategy(cfg.strategy)
    tasks = strategy.DATASET_TASKS
    if info["task"] not in tasks:
        raise DatasetError(
            f"data.dataset: {data_folder} is a {info['task']} dataset; strategy {cfg.strategy} trains on "
            f"{' or '.join(tasks)} datasets"
        )
    strategy.check_dataset(cfg, info)
    if info["task"] == "grounding" and (moving := _geometric_ops(cfg.data.train_pipeline)):
        raise PipelineError(
            f"data.train_pipeline: {', '.join(moving)} move pixels, so the boxes of a grounding dataset would no "
            "longer match; keep to ops that do not (Resize, colour and blur ops)"
        )
    strategy.build_model(cfg, info["num_classes"], info["in_chans"])
    train_views(cfg.data)
    eval_pipeline(cfg.data)
    return data_folder


_GEOMETRIC = ("Crop", "Flip", "Affine", "Rotat", "Perspective", "Augment", "Elastic", "ZoomOut")


def _geometric_ops(ops: list[dict]) -> list[str]:
    """The types of ``ops`` (nested ones included) that move pixels: crops, flips, affine maps, policies."""
    found = []
    for op in ops:
        kind = str(op.get("type", ""))
        if any(word in kind for word in _GEOMETRIC):
            found.append(kind)
        found += _geometric_ops(op.get("transforms", []))
    return found


def for_workers(cfg: ExperimentConfig) -> dict:
    """``cfg`` as the workers get it: a relative ``model.init_from.path`` made absolute here, since workers
    run in Ray's own folders."""
    data = cfg.to_dict()
    init_from = data["model"]["init_from"]
    if init_from is not None and not init_from["path"].startswith(MLFLOW_SCHEMES):
        init_from["path"] = resolve(init_from["path"])
    return data


def build_datasets(cfg: ExperimentConfig, data_folder: str) -> dict[str, ray.data.Dataset]:
    """The train and val Ray Datasets that the workers' shards come from.

    Both are materialised once when ``data.materialize`` (still encoded); with
    ``data.augment_on: ray_data`` the train set is first cut into batch-sized blocks, and
    decoded and augmented in ``map_batches`` tasks every epoch.
    """
    DataContext.get_current().enable_progress_bars = False  # keep job logs readable
    datasets = {split: read_split(data_folder, split) for split in TRAIN_SPLITS}
    if cfg.data.augment_on == "ray_data":
        datasets["train"] = batch_blocks(datasets["train"], cfg)
    if cfg.data.materialize:
        datasets = {split: ds.materialize() for split, ds in datasets.items()}
    if cfg.data.augment_on == "ray_data":
        datasets["train"] = augment_in_ray_data(datasets["train"], cfg)
    return datasets


def build_trainer(
    cfg: ExperimentConfig,
    run_name: str,
    data_folder: str,
    tracking: dict[str, str],
    callbacks: list[UserCallback] | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` running :func:`train_loop_per_worker` for ``cfg``.

    Args:
        cfg: The resolved experiment config.
        run_name: Ray Train run name; reusing a name resumes that run from its storage.
        data_folder: Prepared dataset folder (see :func:`pretrainlab.data.catalog.dataset_dir`).
        tracking: ``{"uri": ..., "run_id": ...}`` of the MLflow run the workers log to.
        callbacks: Ray Train callbacks, such as Tune's ``TuneReportCallback`` in a sweep trial.
    """
    use_gpu = wants_gpu(cfg)
    datasets = build_datasets(cfg, data_folder)
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    checkpoints = cfg.train.checkpoint
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": for_workers(cfg), "dataset": dataset_info(data_folder), "tracking": tracking},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.train.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=resolve(cfg.train.storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=checkpoints.num_to_keep,
                checkpoint_score_attribute=checkpoints.score_metric,
                checkpoint_score_order=checkpoints.score_mode,
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
    )

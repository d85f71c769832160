"""Where the training loop runs: a Ray Train worker, or a Ray Tune function trial on its own.

The loop asks its session for its rank, its device, its data, the checkpoint to resume
from, and where to report; everything else is the same code in both places.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import ray
import ray.train
import ray.train.torch
import ray.tune
import torch
from torch import nn


class LoopSession(Protocol):
    """What :func:`pretrainlab.train.loop.run_loop` needs from the process it runs in."""

    rank: int
    world_size: int
    device: torch.device
    node_id: str

    def get_checkpoint(self) -> ray.train.Checkpoint | None: ...

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def dataset(self, split: str) -> Any: ...

    def report(self, metrics: dict[str, Any], checkpoint: ray.train.Checkpoint | None) -> None: ...

    def checkpoint_from(self, folder: str | os.PathLike) -> ray.train.Checkpoint: ...


class TrainWorkerSession:
    """One worker of a Ray Train worker group (DDP across the group)."""

    def __init__(self) -> None:
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.node_id = ray.get_runtime_context().get_node_id()

    def get_checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        # a model whose heads some batches leave out (``leaves_parameters_unused``) makes DDP look for them
        unused = {"find_unused_parameters": True} if getattr(model, "leaves_parameters_unused", False) else {}
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=unused)

    def dataset(self, split: str) -> Any:
        return ray.train.get_dataset_shard(split)

    def report(self, metrics: dict[str, Any], checkpoint: ray.train.Checkpoint | None) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)

    def checkpoint_from(self, folder: str | os.PathLike) -> ray.train.Checkpoint:
        return ray.train.Checkpoint.from_directory(folder)


class TuneTrialSession:
    """A Ray Tune function trial that trains by itself (one process), as PBT needs: its
    checkpoints go to Tune, which copies them between trials."""

    rank, world_size = 0, 1

    def __init__(self, datasets: dict[str, ray.data.Dataset]) -> None:
        self.datasets = datasets
        self.node_id = ray.get_runtime_context().get_node_id()
        self.device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")

    def get_checkpoint(self) -> ray.tune.Checkpoint | None:
        return ray.tune.get_checkpoint()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def dataset(self, split: str) -> Any:
        return self.datasets[split]

    def report(self, metrics: dict[str, Any], checkpoint: ray.tune.Checkpoint | None) -> None:
        ray.tune.report(metrics, checkpoint=checkpoint)

    def checkpoint_from(self, folder: str | os.PathLike) -> ray.tune.Checkpoint:
        return ray.tune.Checkpoint.from_directory(folder)

"""Training strategies, one module each, in one table written out here.

Every strategy module satisfies :class:`Strategy`:

- ``TASK``: how its models are evaluated and served (a key of :data:`pretrainlab.evaluation.tasks.EVALUATORS`):
  ``"classification"`` (top-1 on logits), ``"embedding"`` (k-nearest-neighbour top-1 of backbone features),
  ``"image_text"`` (retrieval Recall@K; the model has ``encode_image`` and ``encode_text``) or ``"generation"``
  (captioning, VQA, grounding by the dataset task);
- ``DATASET_TASKS``: the dataset tasks it trains on;
- ``check_dataset(cfg, info)``: raises ``DatasetError`` where its settings need something the dataset
  (``info``: the manifest's task, classes and channels) lacks;
- ``build_model(cfg, num_classes, in_chans, load_init_from=True)``: an ``nn.Module`` with a ``backbone`` (the
  network that is kept: headless, ``N x C x H x W`` images to ``N x D`` features) and a ``forward(batch)`` that
  returns a dict with at least ``"loss"`` while training; other scalar entries named ``"log/<name>"`` are logged
  as ``train/<name>``. Call it through :func:`build_model` here, which also applies ``model.init_from.scope: model``.

A model may also have ``after_step(step, total_steps)``, which the training loop calls on every worker after every
optimizer step (momentum encoders, teachers), and ``leaves_parameters_unused = True`` when some batches give no
gradient to some trainable parameters (DDP then looks for them every step). Its ``strategy_params`` are typed in
:mod:`pretrainlab.strategy_params`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Literal, Protocol, runtime_checkable

from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.models.init import initialize_model
from pretrainlab.strategies import (
    barlowtwins,
    blip,
    byol,
    clip,
    dino,
    mae,
    mocov3,
    simclr,
    simmim,
    simsiam,
    supervised,
)

Task = Literal["classification", "embedding", "image_text", "generation"]
"""How a strategy's models are evaluated and served."""


@runtime_checkable
class Strategy(Protocol):
    """What every strategy module provides (see the module docstring)."""

    TASK: Task
    DATASET_TASKS: tuple[str, ...]

    def check_dataset(self, cfg: ExperimentConfig, info: dict[str, Any]) -> None: ...

    def build_model(
        self, cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True
    ) -> nn.Module: ...


STRATEGIES: dict[str, ModuleType] = {
    "supervised": supervised,
    "simclr": simclr,
    "mocov3": mocov3,
    "byol": byol,
    "simsiam": simsiam,
    "barlowtwins": barlowtwins,
    "dino": dino,
    "mae": mae,
    "simmim": simmim,
    "clip": clip,
    "blip": blip,
}
"""Strategy name (a config's ``strategy``, one of :data:`pretrainlab.strategy_params.StrategyName`) -> its module."""


def get_strategy(name: str) -> Strategy:
    """The strategy module registered under ``name``."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy: unknown {name!r}; valid: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def task_of(strategy: str) -> Task:
    """The task of ``strategy``'s models: its module's ``TASK``."""
    return get_strategy(strategy).TASK


def build_model(cfg: ExperimentConfig, num_classes: int, in_chans: int, load_init_from: bool = True) -> nn.Module:
    """``cfg.strategy``'s model, started from ``model.init_from`` when set (and ``load_init_from``).

    The strategy loads a backbone-scoped ``init_from`` itself; ``scope: model`` is loaded here, into the whole
    model, and its report replaces ``model.init_report``.
    """
    model = get_strategy(cfg.strategy).build_model(cfg, num_classes, in_chans, load_init_from)
    init_from = cfg.model.init_from
    if load_init_from and init_from is not None and init_from.scope == "model":
        model.init_report = initialize_model(model, init_from, cfg.runtime.tracking_uri)
    return model

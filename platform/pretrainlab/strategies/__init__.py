"""Training strategies, one module each, named after the module.

Each strategy module provides:

- ``build_model(cfg, num_classes, in_chans, load_init_from=True)`` returning an ``nn.Module``
  (call it through :func:`build_model` here, which also applies ``model.init_from.scope: model``)
  with a ``backbone`` (the network that is kept: headless, ``N x C x H x W`` images to
  ``N x D`` features) and a ``forward(batch)`` that returns a dict with at least ``"loss"``
  while training; other scalar entries named ``"log/<name>"`` are logged as ``train/<name>``;
- ``TASK``: ``"classification"`` (validated by top-1 on logits), ``"embedding"``
  (validated by k-nearest-neighbour top-1 of backbone features on the validation split) or
  ``"image_text"`` (validated by retrieval Recall@K; the model has ``encode_image`` and
  ``encode_text``);
- optionally ``DATASET_TASKS``, the dataset tasks it trains on (default: classification);
- optionally ``check_dataset(cfg, info)``, raising ``DatasetError`` where its settings need
  something the dataset (``info``: the manifest's task, classes and channels) lacks;
- optionally ``Params``, a :class:`pretrainlab.config.StrategyParams` model of its
  ``strategy_params`` in the config;
- optionally a model method ``after_step(step, total_steps)`` that the training loop calls
  on every worker after every optimizer step (momentum encoders, teachers);
- optionally a model attribute ``leaves_parameters_unused = True`` when some batches give no
  gradient to some trainable parameters (DDP then looks for them every step).
"""

import importlib
import pkgutil
from types import ModuleType

from torch import nn

from pretrainlab.config import ExperimentConfig
from pretrainlab.models.init import initialize_model

SHARED_MODULES = ("common",)
"""Modules of this package that strategies share; every other module is a strategy of its own name."""

STRATEGIES: tuple[str, ...] = tuple(
    sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED_MODULES and not m.ispkg)
)
"""Every strategy name; each is the module ``pretrainlab.strategies.<name>``, imported when first asked for."""


def get_strategy(name: str) -> ModuleType:
    """The strategy module registered under ``name``."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy: unknown {name!r}; valid: {', '.join(STRATEGIES)}")
    return importlib.import_module(f"pretrainlab.strategies.{name}")


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

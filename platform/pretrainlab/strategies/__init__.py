"""Training strategies, one module each, named after the module.

Each strategy module provides:

- ``build_model(cfg, num_classes, in_chans, load_init_from=True)`` returning an ``nn.Module``
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

"""The model zoo: named configs and registered MLflow models, listed and built by name.

Zoo names are

- the config's ``name`` for every experiment YAML at the top of the configs folder
  (``$PRETRAINLAB_CONFIGS``, else the project's ``configs/``), e.g. ``resnet10t_1xb128_fmnist``,
  as MMPreTrain names its models after their configs;
- ``models:/NAME`` for every model in the MLflow registry (``resolve_tracking_uri``).

:func:`get_model` returns the strategy's ``nn.Module`` in eval mode with a :class:`ModelInfo`
as ``model.info``: task, class names, config, input channels and training image size, from
which inferencers build the evaluation preprocessing.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch import nn

from pretrainlab.config import ExperimentConfig, load_config
from pretrainlab.data.catalog import dataset_info, dataset_location, prepared_location
from pretrainlab.data.errors import DatasetError
from pretrainlab.data.shards import load_manifest, shard_paths
from pretrainlab.inference.inputs import InputPreprocessor
from pretrainlab.inference.loading import load_model
from pretrainlab.paths import MLFLOW_SCHEMES, resolve_tracking_uri
from pretrainlab.strategies import STRATEGIES, build_model, get_strategy
from pretrainlab.tracking.mlflow import TrackingError, check_tracking, client_for
from pretrainlab.tracking.registry import ModelSourceError, resolve_model_source, served_version

CONFIGS_ENV = "PRETRAINLAB_CONFIGS"
_warned_stores: set[str] = set()


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`get_model` attaches to the model it returns, as ``model.info``."""

    name: str  # the zoo name, folder or URI it was asked for
    task: str
    config: ExperimentConfig
    class_names: list[str]
    in_chans: int
    image_size: tuple[int, int] | None  # H x W of every training image; None: mixed sizes or dataset not here
    source: str  # the checkpoint loaded, or the config file of a randomly initialised model
    meta: dict[str, Any] = field(default_factory=dict)  # the checkpoint's config.json (empty for random init)

    def preprocessor(self) -> InputPreprocessor:
        """The evaluation preprocessing of this model's inputs."""
        return InputPreprocessor(self.config.data, self.in_chans, self.image_size)


GENERATION_TASKS = ("caption", "vqa", "grounding", "retrieval")
"""The tasks of generation models, by their dataset."""


def task_of(strategy: str) -> str:
    """The task of ``strategy``'s models (what inferencers they get): its module's ``TASK``."""
    return get_strategy(strategy).TASK


def model_task(cfg: ExperimentConfig, dataset_task: str | None = None) -> str:
    """The task of a model of ``cfg``: its strategy's, except for generation strategies, whose models do
    what their dataset teaches (``caption``, ``vqa``, ``grounding``, ``retrieval``).

    Args:
        cfg: The model's config.
        dataset_task: The task of the dataset it was trained on (a checkpoint's ``dataset_task``); default:
            the prepared dataset's, else ``generation``.
    """
    task = task_of(cfg.strategy)
    if task != "generation":
        return task
    if dataset_task is not None:
        return dataset_task
    location = prepared_location(cfg)
    return load_manifest(location)["task"] if location is not None else task


def model_info(model: nn.Module) -> ModelInfo:
    """The :class:`ModelInfo` of a model made by :func:`get_model`."""
    info = getattr(model, "info", None)
    if not isinstance(info, ModelInfo):
        raise ValueError(f"{type(model).__name__} carries no ModelInfo (model.info): create it with get_model()")
    return info


def configs_folder() -> Path:
    """``$PRETRAINLAB_CONFIGS``, else the project's ``configs/`` next to ``platform/``."""
    return Path(os.environ.get(CONFIGS_ENV) or Path(__file__).resolve().parents[3] / "configs")


def zoo_name(cfg: ExperimentConfig) -> str:
    """The config's ``name`` (by convention its file name, e.g. ``resnet10t_1xb128_fmnist``)."""
    return cfg.name


def zoo_configs() -> dict[str, tuple[Path, ExperimentConfig]]:
    """Zoo name -> (file, config) for the YAML files at the top of :func:`configs_folder`.

    Raises:
        ValueError: two files give the same zoo name, or ``$PRETRAINLAB_CONFIGS`` is no folder.
        ConfigError: a file is not a valid config.
    """
    folder = configs_folder()
    if not folder.is_dir():
        if os.environ.get(CONFIGS_ENV):
            raise ValueError(f"${CONFIGS_ENV}={folder}: no such folder")
        return {}
    found: dict[str, tuple[Path, ExperimentConfig]] = {}
    for path in sorted(folder.glob("*.yaml")):
        cfg = load_config(path)
        name = zoo_name(cfg)
        if name in found:
            raise ValueError(f"zoo name {name!r} is given by two configs: {found[name][0]} and {path}")
        found[name] = (path, cfg)
    return found


def registered_models() -> dict[str, str | None]:
    """``models:/NAME`` -> task for every registered model; empty, with one warning per store, when unreachable."""
    uri = resolve_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return {}  # no store yet: nothing registered
    try:
        check_tracking(uri, timeout_s=2.0)
        client = client_for(uri)
        return {f"models:/{m.name}": _registered_task(client, m.name) for m in _all_registered(client)}
    except (TrackingError, MlflowException, OSError) as err:
        if uri not in _warned_stores:
            _warned_stores.add(uri)
            warnings.warn(f"model registry at {uri} unreachable, listing configs only: {err}", stacklevel=3)
        return {}


def _all_registered(client: MlflowClient) -> list[Any]:
    page = client.search_registered_models(max_results=1000)
    models = list(page)
    while page.token:
        page = client.search_registered_models(max_results=1000, page_token=page.token)
        models.extend(page)
    return models


def _registered_task(client: MlflowClient, model: str) -> str | None:
    """The task of the served version, from its training run's ``strategy`` tag (None when unknown)."""
    version = served_version(client, model)
    if version is None or not version.run_id:
        return None
    try:
        strategy = client.get_run(version.run_id).data.tags.get("strategy")
    except MlflowException:  # the run was deleted
        return None
    return task_of(strategy) if strategy in STRATEGIES else None


def list_models(pattern: str | None = None, task: str | None = None) -> list[str]:
    """Zoo names: configs first, then registered models, each sorted.

    Args:
        pattern: fnmatch-style glob, case-insensitive, e.g. ``*resnet*``.
        task: keep only models of this task (e.g. ``classification``).
    """
    tasks = sorted({task_of(strategy) for strategy in STRATEGIES} | set(GENERATION_TASKS))
    if task is not None and task not in tasks:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(tasks)}")
    configs = {name: model_task(cfg) for name, (_, cfg) in zoo_configs().items()}
    entries = {**dict(sorted(configs.items())), **dict(sorted(registered_models().items()))}
    return [
        name
        for name, kind in entries.items()
        if (task is None or kind == task) and (pattern is None or fnmatch.fnmatchcase(name.lower(), pattern.lower()))
    ]


def get_model(
    name_or_uri: str | os.PathLike,
    pretrained: bool | str | os.PathLike = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A model in eval mode, with its :class:`ModelInfo` as ``model.info``.

    Args:
        name_or_uri: A zoo name, a checkpoint folder, ``models:/NAME`` (champion, else latest
            version), ``models:/NAME@alias``, ``models:/NAME/3`` or ``runs:/ID/checkpoint``.
        pretrained: For zoo names: False builds the config's model randomly initialised
            (seeded by ``runtime.seed``); True loads the served version of the config's
            ``runtime.registered_model``; a checkpoint folder or URI loads that checkpoint.
            Other sources always load their checkpoint.
        device: Default: CUDA when available, else CPU.

    Raises:
        ValueError: an unknown name (with close matches), no registered version, a checkpoint
            of another zoo model, an unprepared dataset for a randomly initialised model.
    """
    source = os.fspath(name_or_uri)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = {} if source.startswith(MLFLOW_SCHEMES) else zoo_configs()
    if source in configs:
        return _zoo_model(source, *configs[source], pretrained, device)
    if not isinstance(pretrained, bool):
        raise ValueError(f"pretrained={os.fspath(pretrained)!r} applies to zoo names; {source!r} is not one")
    if source.startswith(MLFLOW_SCHEMES) or Path(source).is_dir():
        return _checkpoint_model(source, source, device)
    names = list_models()
    close = difflib.get_close_matches(source, names, n=5, cutoff=0.5)
    hint = f"close matches: {', '.join(close)}" if close else "see pretrainlab.list_models()"
    raise ValueError(f"{source!r} is not a zoo name, a checkpoint folder, or a models:/ or runs:/ URI; {hint}")


def _zoo_model(
    name: str, path: Path, cfg: ExperimentConfig, pretrained: bool | str | os.PathLike, device: torch.device
) -> nn.Module:
    if pretrained is False:
        return _random_model(name, path, cfg, device)
    checkpoint = _registered_checkpoint(name, path, cfg) if pretrained is True else os.fspath(pretrained)
    model = _checkpoint_model(name, checkpoint, device, cfg.runtime.tracking_uri)
    trained = zoo_name(model_info(model).config)
    if trained != name:
        raise ValueError(f"{checkpoint}: a checkpoint of {trained}, not of {name}")
    return model


def _registered_checkpoint(name: str, path: Path, cfg: ExperimentConfig) -> str:
    """``models:/MODEL/VERSION`` of the version served for the config's ``runtime.registered_model``."""
    model = cfg.runtime.registered_model
    if not model:
        raise ValueError(f"{name}: {path} sets no runtime.registered_model; give pretrained=CHECKPOINT instead")
    return _pinned_uri(
        f"models:/{model}", cfg.runtime.tracking_uri, f"; train it first: python jobs/pretrain.py {path}"
    )


def _checkpoint_model(name: str, source: str, device: torch.device, tracking_uri: str | None = None) -> nn.Module:
    source = _pinned_uri(source, tracking_uri)
    loaded = load_model(source, device, tracking_uri)
    info = ModelInfo(
        name=name,
        task=model_task(loaded.config, loaded.meta.get("dataset_task")),
        config=loaded.config,
        class_names=loaded.class_names,
        in_chans=int(loaded.meta["in_chans"]),
        image_size=_image_size(loaded.config, name),
        source=source,
        meta=loaded.meta,
    )
    loaded.model.info = info
    return loaded.model


def _pinned_uri(source: str, tracking_uri: str | None, hint: str = "") -> str:
    """``models:/NAME/VERSION`` of what a ``models:/`` source names now; ``runs:/`` URIs and folders as they are.

    Raises:
        ValueError: the source names no registered version, or its store cannot be reached.
    """
    try:
        return resolve_model_source(source, tracking_uri).uri
    except (ModelSourceError, TrackingError) as err:
        raise ValueError(f"{err}{hint}") from None


def _random_model(name: str, path: Path, cfg: ExperimentConfig, device: torch.device) -> nn.Module:
    """The config's model as training starts it: classes and channels from its prepared dataset."""
    location = prepared_location(cfg)
    if location is None:
        raise ValueError(
            f"{name}: dataset {cfg.data.dataset!r} is not prepared in {dataset_location(cfg)}; its classes and "
            "channels size the model: convert it first (jobs/prepare_data.py; a training run converts a built-in set)"
        )
    facts = dataset_info(location)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.runtime.seed)
        model = build_model(cfg, facts["num_classes"], facts["in_chans"])
    model.info = ModelInfo(
        name=name,
        task=model_task(cfg),
        config=cfg,
        class_names=list(facts["class_names"]),
        in_chans=facts["in_chans"],
        image_size=_image_size(cfg, name),
        source=f"{path} ({_init_source(cfg)})",
    )
    return model.to(device).eval()


def _init_source(cfg: ExperimentConfig) -> str:
    """Where a zoo model's weights start: ``random init`` or the ``model.init_from`` it names."""
    init_from = cfg.model.init_from
    return "random init" if init_from is None else f"{init_from.scope} from {init_from.path}"


def _image_size(cfg: ExperimentConfig, name: str) -> tuple[int, int] | None:
    """H x W shared by every training image of the config's dataset (a folder or a URI); None for mixed sizes or
    no dataset here."""
    dataset = cfg.data.dataset
    try:
        paths = shard_paths(dataset_location(cfg), "train")
    except DatasetError as err:
        warnings.warn(
            f"{name}: dataset {dataset!r} cannot be read ({err}), so the training image size is unknown: inputs "
            "go to data.eval_pipeline at their own size",
            stacklevel=4,
        )
        return None
    table = pa.concat_tables(pq.read_table(p, columns=["height", "width"]) for p in paths)
    heights, widths = (pc.unique(table[column]).to_pylist() for column in ("height", "width"))
    return (heights[0], widths[0]) if len(heights) == len(widths) == 1 else None

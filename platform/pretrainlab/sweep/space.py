"""The ``sweep.space`` of a config: checked against the config's keys, turned into Tune domains and trial configs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_origin

from pydantic import BaseModel
from ray import tune

from pretrainlab.config import (
    ConfigError,
    ExperimentConfig,
    SearchDimension,
    SweepConfig,
    section_model,
    set_dotted,
    validate,
)


def check_space(cfg: ExperimentConfig) -> SweepConfig:
    """The config's sweep section, once every key names a config field and every value is accepted there.

    Raises:
        ConfigError: no ``sweep`` section, a key that is not in the config (with the valid
            keys at that level), or a value the field refuses.
    """
    if cfg.sweep is None:
        raise ConfigError(f"{cfg.name}: no sweep section; add sweep.space (see configs/sweeps/)")
    for key, dim in cfg.sweep.space.items():
        _check_key(key)
        for value in _probe_values(dim):
            try:
                trial_config(cfg, {key: value})
            except ConfigError as err:
                detail = "; ".join(line.strip() for line in str(err).splitlines()[1:]) or str(err)
                raise ConfigError(f"sweep.space.{key}: value {value!r} is refused: {detail}") from None
    return cfg.sweep


def trial_config(base: ExperimentConfig, params: Mapping[str, Any]) -> ExperimentConfig:
    """``base`` with the sampled ``params`` (dotted keys) set, without its sweep section.

    Checkpoints are ranked by the sweep's metric, so that each trial keeps its best one.
    """
    data = base.to_dict()
    sweep = data.pop("sweep", None)
    if sweep is not None:
        data["train"]["checkpoint"].update(score_metric=sweep["metric"], score_mode=sweep["mode"])
    for key, value in params.items():
        set_dotted(data, key, value, f"sweep.space.{key}")
    return validate(data, source=f"trial {dict(params)}")


def tune_domain(dim: SearchDimension, grid_as_choice: bool = False) -> Any:
    """The Tune search domain of one dimension."""
    if dim.kind == "grid" and not grid_as_choice:
        return tune.grid_search(dim.values)
    if dim.kind in ("choice", "grid"):
        return tune.choice(dim.values)
    low, high = dim.values
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[dim.kind](low, high)


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's ``param_space``: dotted config keys to domains (``search_alg: grid`` makes every axis a grid)."""
    if sweep.search_alg == "grid":
        return {key: tune.grid_search(dim.values) for key, dim in sweep.space.items()}
    return {key: tune_domain(dim) for key, dim in sweep.space.items()}


def _probe_values(dim: SearchDimension) -> list[Any]:
    if dim.kind in ("choice", "grid"):
        return list(dim.values)
    low, high = dim.values
    return [low, high - 1 if dim.kind == "randint" else high]


def _check_key(key: str) -> None:
    model: type[BaseModel] | None = ExperimentConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if model is None:
            raise ConfigError(f"sweep.space.{key}: {'.'.join(parts[:depth])} is a value, not a section")
        if part == "sweep" or part not in model.model_fields:
            where = ".".join(parts[:depth]) or "the top level"
            valid = ", ".join(k for k in model.model_fields if k != "sweep")
            raise ConfigError(f"sweep.space.{key}: {part!r} is not a config key; valid keys at {where}: {valid}")
        annotation = model.model_fields[part].annotation
        if _is_mapping(annotation):
            return  # a free-form mapping such as model.backbone_kwargs takes any sub-key
        model = section_model(annotation)
    if model is not None:
        raise ConfigError(f"sweep.space.{key}: a section; name one of its keys: {', '.join(model.model_fields)}")


def _is_mapping(annotation: Any) -> bool:
    return get_origin(annotation) is dict

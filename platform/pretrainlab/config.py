"""Typed experiment configuration: YAML files with ``_base_`` inheritance and ``--set`` overrides.

A config file is a YAML mapping validated against :class:`ExperimentConfig`. It may name
one or more base files under ``_base_`` (paths relative to the file); bases are merged in
order, later ones win, and the file itself wins over all of them. Mappings merge key by
key; any other value (lists included) replaces the inherited one. Overrides given as
``a.b=c`` are applied last, their values parsed as YAML scalars.

Every section forbids unknown keys, so a typo fails with the key's name and the valid
keys rather than being silently ignored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pretrainlab.strategy_params import STRATEGY_PARAMS, StrategyName

BASE_KEY = "_base_"


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message names the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InitFromConfig(_Section):
    """Weights to start from (fine-tuning): a PretrainLab checkpoint, a logged or registered model, or a file."""

    source: Literal["pretrainlab", "torchvision", "timm"] = Field(
        "pretrainlab",
        description="pretrainlab: a checkpoint folder, runs:/RUN_ID/PATH or models:/NAME@ALIAS (or /VERSION); "
        "torchvision / timm: a state dict file (.pth, .bin, .safetensors) with that library's key names.",
    )
    path: str = Field(min_length=1, description="Folder, file or MLflow URI, as source says.")
    scope: Literal["backbone", "model"] = Field(
        "backbone",
        description="backbone: only the backbone's weights (fine-tuning to other classes); model (source "
        "pretrainlab): every weight the model shares with the checkpoint, e.g. a BLIP model trained on one task "
        "(encoders, decoder) going on to another; the checkpoint's other tensors (its task's heads) are dropped.",
    )
    strict: bool = Field(
        True, description="Fail, listing the keys, unless every weight in scope comes from the checkpoint and fits."
    )

    @model_validator(mode="after")
    def _model_scope_needs_a_pretrainlab_checkpoint(self) -> InitFromConfig:
        if self.scope == "model" and self.source != "pretrainlab":
            raise ValueError(f"scope 'model' needs source 'pretrainlab' (a {self.source} file holds only a backbone)")
        return self


class ModelConfig(_Section):
    """Backbone from timm (created headless) and the head on top of it."""

    backbone: str = "resnet18"
    backbone_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for timm.create_model; for ViT / Swin on small images set "
        "img_size and patch_size here.",
    )
    stem_stride: int | None = Field(
        None,
        ge=1,
        description="Total downsampling of a CNN's stem, for small images (e.g. 1 or 2 on 28-32 px); null keeps "
        "the model's own (4 for ResNet / ConvNeXt, 2 for MobileNet / EfficientNet / RegNet).",
    )
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    head_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    init_from: InitFromConfig | None = None


class ViewConfig(_Section):
    """One kind of view in a multi-view batch (SimCLR, BYOL, DINO's global and local crops)."""

    pipeline: list[dict[str, Any]] = Field(default_factory=list, description="Ops, as in data.train_pipeline.")
    count: int = Field(1, ge=1, description="How many views of this kind each image gets.")


class MixupConfig(_Section):
    """timm ``Mixup``: mixup and/or cutmix on the training batch, soft targets (label smoothing folded in)."""

    mixup_alpha: float = Field(0.8, ge=0)
    cutmix_alpha: float = Field(1.0, ge=0)
    prob: float = Field(1.0, ge=0, le=1, description="Chance that a batch (or pair/element) is mixed at all.")
    switch_prob: float = Field(0.5, ge=0, le=1, description="Chance of cutmix instead of mixup when both are on.")
    mode: Literal["batch", "pair", "elem"] = "batch"

    @model_validator(mode="after")
    def _something_mixes(self) -> MixupConfig:
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("mixup_alpha and cutmix_alpha are both 0: remove data.mixup instead")
        return self


class MaskConfig(_Section):
    """Patch masks for masked image modelling, added to each training batch as ``mask``."""

    kind: Literal["random", "block"] = Field("random", description="random: MAE; block: SimMIM / BEiT.")
    ratio: float = Field(0.75, gt=0, lt=1)
    patch_size: int = Field(16, ge=1, description="Mask granularity in input pixels.")


class DataConfig(_Section):
    """Which prepared dataset to read, how to augment it, and where augmentation runs."""

    dataset: str = Field("fmnist", description="A built-in dataset name or the path of a prepared shard folder.")
    root: str = Field("data", description="Where built-in datasets are converted to (relative to PRETRAINLAB_HOME).")
    mean: list[float] = Field(default_factory=lambda: [0.5])
    std: list[float] = Field(default_factory=lambda: [0.5])
    train_pipeline: list[dict[str, Any]] = Field(
        default_factory=list, description="Per-image training ops: torchvision transforms.v2 names and timm ops."
    )
    eval_pipeline: list[dict[str, Any]] = Field(default_factory=list, description="Per-image evaluation ops.")
    views: list[ViewConfig] = Field(
        default_factory=list, description="Multi-view training batches (replaces train_pipeline when set)."
    )
    mixup: MixupConfig | None = None
    repeated_augmentation: int = Field(
        1,
        ge=1,
        description="Repeated augmentation: each batch of rows to augment keeps 1/N of them, each N times with its "
        "own augmentation; an epoch keeps its number of steps, so it sees 1/N of the images.",
    )
    mask: MaskConfig | None = None
    context_length: int = Field(
        48, ge=3, description="Token ids per text (CLIP BPE; start and end tokens included, longer texts cut)."
    )
    texts_per_image: int = Field(
        1,
        ge=1,
        description="VQA and grounding rows: how many of an image's questions / objects a row teaches (drawn "
        "without replacement, fewer when it has fewer); the image is encoded once for all of them.",
    )
    augment_on: Literal["worker", "ray_data"] = Field(
        "worker", description="Decode + augment in the training worker, or in Ray Data map_batches tasks."
    )
    ray_data_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data augmentation task (augment_on: ray_data).")
    shuffle_buffer_rows: int = Field(8192, ge=0, description="Local shuffle buffer per worker; 0 keeps shard order.")
    materialize: bool = Field(
        True,
        description="Read the shards once into Ray's object store; false streams them from Parquet every epoch "
        "(then leave CPUs free for Ray Data's read tasks).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if self.mixup is not None and self.views:
            raise ValueError("mixup applies to single-view classification batches, not to data.views")
        return self


class OptimConfig(_Section):
    """Optimizer (timm's optimizer factory) and its hyperparameters."""

    name: Literal["sgd", "adamw", "adam", "lamb", "lars", "rmsprop"] = "sgd"
    lr: float = Field(0.1, gt=0, description="At base_batch_size images per step when that is set.")
    base_batch_size: int | None = Field(
        None,
        ge=1,
        description="Automatic lr scaling: the lr used is lr x global batch / base_batch_size, the global batch "
        "being batch_size x num_workers x accumulate_steps. null uses lr as it is.",
    )
    weight_decay: float = Field(5e-5, ge=0)
    decay_norm_and_bias: bool = Field(
        False, description="Apply weight decay to norm weights, biases and other 1-D parameters too."
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Layer-wise lr decay (ViT / Swin / ConvNeXt fine-tuning): layer i of L gets lr x "
        "layer_decay^(L - i), the head and last layer the full lr.",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd, lars, rmsprop.")
    nesterov: bool = Field(True, description="sgd and lars.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adamw, adam, lamb.")
    trust_coeff: float = Field(
        0.001,
        gt=0,
        description="lars: the trust coefficient (eta); a layer's lr is scaled by eta x |w| / |grad|.",
    )
    trust_clip: bool = Field(
        False, description="lars: cap the trust ratio at 1 (LARC clipping): no layer steps faster than lr."
    )

    @model_validator(mode="after")
    def _trust_only_for_lars(self) -> OptimConfig:
        fields = type(self).model_fields
        misplaced = [key for key in ("trust_clip", "trust_coeff") if getattr(self, key) != fields[key].default]
        if misplaced and self.name != "lars":
            raise ValueError(f"optim {', '.join(misplaced)}: a lars setting, but optim.name is {self.name}")
        return self


class ScheduleConfig(_Section):
    """Learning-rate schedule, updated every iteration, after a linear warmup.

    ``cosine`` decays to ``min_lr_ratio``; ``step`` multiplies by ``gamma`` at each of
    ``milestones`` (epochs); ``onecycle`` rises along a half cosine from
    ``warmup_start_factor`` over ``warmup_epochs`` and falls along one to ``min_lr_ratio``
    (torch's ``OneCycleLR`` with ``anneal_strategy="cos"``).
    """

    name: Literal["cosine", "constant", "step", "onecycle"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_start_factor: float = Field(0.01, gt=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    milestones: list[float] = Field(default_factory=list, description="step: epochs at which the lr drops.")
    gamma: float = Field(0.1, gt=0, le=1, description="step: the factor of each drop.")

    @model_validator(mode="after")
    def _milestones_fit(self) -> ScheduleConfig:
        if self.name == "step" and not self.milestones:
            raise ValueError("schedule step needs milestones (epochs), e.g. [30, 60]")
        if self.milestones != sorted(self.milestones):
            raise ValueError(f"milestones must increase, got {self.milestones}")
        if self.name == "onecycle" and self.warmup_epochs == 0:
            raise ValueError("schedule onecycle rises over warmup_epochs: set it above 0")
        return self


class CheckpointConfig(_Section):
    """How many checkpoints to keep and which metric ranks them."""

    num_to_keep: int = Field(2, ge=1)
    score_metric: str = "val/top1"
    score_mode: Literal["max", "min"] = "max"


class EmaConfig(_Section):
    """An exponential moving average of the weights (timm ``ModelEmaV3``), evaluated and saved with the raw ones."""

    decay: float = Field(0.9998, gt=0, lt=1)
    warmup: bool = Field(
        False, description="Ramp the decay up as 1 - (1 + step / warmup_gamma)^-warmup_power (timm's warmup)."
    )
    warmup_gamma: float = Field(1.0, gt=0)
    warmup_power: float = Field(0.75, gt=0)


class ClipGradConfig(_Section):
    """Gradient clipping before every optimizer step (timm ``dispatch_clip_grad``)."""

    max: float = Field(gt=0, description="The bound: global norm (norm), per-element value (value), or AGC ratio.")
    mode: Literal["norm", "value", "agc"] = "norm"


class TrainConfig(_Section):
    """Epochs, batch size, the Ray Train worker group and per-step tricks."""

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(
        128, ge=1, description="Per worker and step; the global batch is batch_size x num_workers x accumulate_steps."
    )
    accumulate_steps: int = Field(1, ge=1, description="Batches whose gradients add up before each optimizer step.")
    clip_grad: ClipGradConfig | None = None
    ema: EmaConfig | None = None
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1, description="CPUs each worker holds; torch uses as many threads.")
    compile: Literal["default", "reduce-overhead", "max-autotune"] | None = Field(
        None, description="torch.compile mode of the model's forward (worth it on GPU); null: eager."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How the workers' resource bundles spread over nodes; STRICT_SPREAD: one per node."
    )
    use_gpu: bool | Literal["auto"] = "auto"
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto",
        description="Mixed precision of training steps and validation (torch.autocast). auto: on GPU bf16 where "
        "supported, else fp16 with a grad scaler; on CPU full precision. bf16 on CPU pays off where the CPU has "
        "AMX or AVX-512 BF16 units (benchmarks/cpu_amp.py); on a CPU without AVX-512 it is tens of times slower "
        "(a warning says so). fp16 needs a GPU.",
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts allowed; -1 retries forever.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    storage_path: str = Field("runs", description="Ray Train storage (relative to PRETRAINLAB_HOME or a URI).")
    log_every_n_steps: int = Field(10, ge=1)
    eval_batch_size: int = Field(512, ge=1)

    @field_validator("amp", mode="before")
    @classmethod
    def _yaml_off_is_off(cls, value: Any) -> Any:
        """YAML 1.1 reads an unquoted ``off`` as false."""
        return "off" if value is False else value

    @model_validator(mode="after")
    def _fp16_needs_a_gpu(self) -> TrainConfig:
        if self.amp == "fp16" and self.use_gpu is False:
            raise ValueError("amp: fp16 needs a GPU and use_gpu is false; use bf16 or off on CPU")
        return self


class RuntimeConfig(_Section):
    """Seed and tracking."""

    seed: int = 0
    experiment: str = "pretrainlab"
    tracking_uri: str | None = Field(
        None, description="null: $MLFLOW_TRACKING_URI, else sqlite:///$PRETRAINLAB_HOME/mlflow.db."
    )
    registered_model: str | None = Field(None, description="Register the final checkpoint under this model name.")


SEARCH_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class SearchDimension(_Section):
    """One axis of a sweep's search space, written ``{KIND: [values or low, high]}`` in YAML.

    ``choice`` samples one of the values, ``grid`` tries every value (times
    ``num_samples``), ``uniform`` / ``loguniform`` sample a float in ``[low, high]``,
    ``randint`` an integer in ``[low, high)``.
    """

    kind: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    values: list[Any] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _from_one_key_mapping(cls, data: Any) -> Any:
        if isinstance(data, dict) and len(data) == 1 and next(iter(data)) in SEARCH_KINDS:
            kind, values = next(iter(data.items()))
            return {"kind": kind, "values": values}
        if isinstance(data, dict) and "kind" in data:
            return data
        raise ValueError(f"expected one of {{{', '.join(SEARCH_KINDS)}}}: [...], got {data!r}")

    @model_validator(mode="after")
    def _range_is_valid(self) -> SearchDimension:
        if self.kind in ("choice", "grid"):
            return self
        if len(self.values) != 2 or not all(isinstance(v, int | float) for v in self.values):
            raise ValueError(f"{self.kind} needs [low, high], got {self.values}")
        low, high = self.values
        if low >= high:
            raise ValueError(f"{self.kind}: low must be below high, got {self.values}")
        if self.kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {low}")
        if self.kind == "randint" and not all(isinstance(v, int) for v in self.values):
            raise ValueError(f"randint needs integer bounds, got {self.values}")
        return self


class SchedulerConfig(_Section):
    """The trial scheduler: ASHA stops bad trials early, PBT copies good ones, ``none`` runs all to the end."""

    type: Literal["asha", "pbt", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it may be stopped.")
    reduction_factor: float = Field(4.0, gt=1, description="ASHA: 1/reduction_factor of trials go on at a rung.")
    perturbation_interval: int = Field(1, ge=1, description="PBT: epochs between exploit/explore steps.")
    quantile_fraction: float = Field(0.5, gt=0, le=0.5, description="PBT: the bottom fraction copies the top.")
    resample_probability: float = Field(0.25, ge=0, le=1, description="PBT: resample instead of perturb.")
    synch: bool = Field(
        True, description="PBT: exploit once every trial reached the interval (checkpoints saved), not as each does."
    )


class SweepConfig(_Section):
    """A Ray Tune sweep over config keys (``jobs/sweep.py``); each trial trains like ``jobs/pretrain.py``."""

    space: dict[str, SearchDimension] = Field(min_length=1, description="Dotted config key -> search dimension.")
    metric: str = "val/top1"
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(4, ge=1, description="Trials to sample (each grid point this many times).")
    max_concurrent_trials: int = Field(2, ge=1, description="At most; fewer when the cluster cannot fit them.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    search_alg: Literal["random", "grid", "optuna"] = Field(
        "random", description="random (grid axes expanded), grid (every axis a grid), optuna (if installed)."
    )

    @model_validator(mode="after")
    def _search_fits_space(self) -> SweepConfig:
        kinds = {key: dim.kind for key, dim in self.space.items()}
        if self.search_alg == "grid" and (bad := [k for k, kind in kinds.items() if kind not in ("grid", "choice")]):
            raise ValueError(f"search_alg grid needs grid or choice axes; not: {', '.join(bad)}")
        if self.search_alg == "optuna" and (bad := [k for k, kind in kinds.items() if kind == "grid"]):
            raise ValueError(f"search_alg optuna samples every axis; use choice instead of grid for: {', '.join(bad)}")
        return self


class ExperimentConfig(_Section):
    """A whole experiment; the YAML files under configs/ are instances of this."""

    name: str
    strategy: StrategyName = Field(
        "supervised", description="A training strategy: supervised, a self-supervised or an image-text method."
    )
    strategy_params: dict[str, Any] = Field(
        default_factory=dict,
        description="The strategy's own settings (projector sizes, temperature, momentum...); validated, with "
        "defaults filled in, against its model in pretrainlab.strategy_params.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    sweep: SweepConfig | None = Field(None, description="Only read by jobs/sweep.py.")

    @field_validator("name")
    @classmethod
    def _name_is_plain(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\ "):
            raise ValueError("name must be non-empty, without spaces or slashes")
        return value

    @model_validator(mode="after")
    def _strategy_params_fit(self) -> ExperimentConfig:
        params = STRATEGY_PARAMS[self.strategy]
        if params is None:
            if self.strategy_params:
                raise ValueError(f"strategy_params: strategy {self.strategy} takes none, got {self.strategy_params}")
            return self
        try:
            resolved = params.model_validate(self.strategy_params)
        except ValidationError as err:
            problems = "; ".join(_describe(e, params, "strategy_params") for e in err.errors())
            raise ValueError(f"strategy {self.strategy}: {problems}") from None
        self.__dict__["strategy_params"] = resolved.model_dump(mode="json")  # defaults filled in, no re-validation
        return self

    @model_validator(mode="after")
    def _batches_fit(self) -> ExperimentConfig:
        if self.data.mixup is not None and self.train.batch_size % 2:
            raise ValueError(f"data.mixup needs an even train.batch_size, got {self.train.batch_size}")
        if self.train.batch_size % self.data.repeated_augmentation:
            raise ValueError(
                f"data.repeated_augmentation {self.data.repeated_augmentation} must divide "
                f"train.batch_size {self.train.batch_size}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-compatible data."""
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, str]:
        """Dotted keys to string values, as logged to MLflow params."""
        return flatten(self.to_dict())

    def digest(self) -> str:
        """A short stable hash of the resolved config."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to ``{"a.b": "value"}``; leaves are JSON-encoded unless strings."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value if isinstance(value, str) else json.dumps(value)
    return flat


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``: mappings merge, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_yaml_tree(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config and its ``_base_`` files into one merged mapping (not yet validated)."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise ConfigError(f"{path}: _base_ cycle: {cycle}")
    if not path.is_file():
        where = f" (named in _base_ of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, read_yaml_tree(path.parent / base, (*_chain, path)))
    return merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides (values parsed as YAML) to a copy of ``data``."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=0.05")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        set_dotted(data, key.strip(), value, f"override {item!r}")
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set ``data["a"]["b"] = value`` for ``key`` ``a.b`` in place, creating sections as needed."""
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # a missing or unset optional section
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field typed ``Section`` or ``Section | None``, else None."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _model_for(path: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in path:
        field = model.model_fields.get(str(part)) if model else None
        model = section_model(field.annotation) if field else None
    return model


def _describe(err: dict[str, Any], root: type[BaseModel] | None = None, prefix: str = "") -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in (prefix, *loc) if p != "") or "(top level)"
    if err["type"] == "extra_forbidden":
        section = _model_for(loc[:-1], root or ExperimentConfig)
        valid = ", ".join(section.model_fields) if section else "?"
        return f"{key}: unknown key; valid keys here: {valid}"
    if not loc and err["type"] == "value_error":  # a check across sections: its message names the keys
        return str(err["ctx"]["error"])
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def validate(data: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """Validate merged config data, turning pydantic errors into one readable :class:`ConfigError`."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        lines = [_describe(e) for e in err.errors()]
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config with its bases, apply ``--set`` overrides and validate.

    Args:
        path: The YAML file.
        overrides: ``KEY=VALUE`` strings with dotted keys, applied last.

    Returns:
        The validated config.

    Raises:
        ConfigError: The file, a base, a key or a value is invalid; the message says which.
    """
    data = apply_overrides(read_yaml_tree(path), overrides or [])
    return validate(data, source=str(path))

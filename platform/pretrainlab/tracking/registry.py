"""Promoting the best run of an experiment: register its checkpoint, move an alias to it.

:func:`promote` finds the best FINISHED run by a metric (:func:`find_best_run`), reuses or
creates the model version of its checkpoint (:func:`ensure_version`) and points an alias
such as ``champion`` at it (:func:`set_alias_with_previous`); the alias's former holder
gets the ``previous`` alias. Calling it again with nothing new changes nothing.

:func:`resolve_model_source` is the one place that reads a model source: ``models:/NAME@alias``,
``models:/NAME/3`` and bare ``models:/NAME`` (:func:`served_version`: the ``champion`` alias, else
the latest version) become the pinned ``models:/NAME/VERSION`` they name now; ``runs:/`` URIs and
folders pass through as they are.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pretrainlab.paths import resolve_tracking_uri
from pretrainlab.tracking.mlflow import CHECKPOINT_ARTIFACT, TrackingError, check_tracking, register_checkpoint

MODEL_PARAM = "runtime.registered_model"
EVALUATION_TAG = "pretrainlab.evaluated"  # set by jobs/evaluate.py on its runs, which hold no checkpoint
DEFAULT_ALIAS = "champion"
_ALIAS = re.compile(r"[\w-]+")
_RESERVED_ALIAS = re.compile(r"latest|v\d+", re.IGNORECASE)
_ALIAS_URI = re.compile(r"models:/([^/@]+)@([\w-]+)")  # models:/NAME@alias
_VERSION_URI = re.compile(r"models:/([^/@]+)/(\d+)")  # models:/NAME/3
_BARE_URI = re.compile(r"models:/([^/@]+)/?")  # models:/NAME


class PromotionError(ValueError):
    """Nothing can be promoted; the message says why."""


@dataclass
class Promotion:
    """What :func:`promote` did (or, with ``dry_run``, would do)."""

    run_id: str
    run_name: str
    metric: str
    value: float
    model: str
    version: str | None  # None: a version still to be registered (dry run)
    registered: bool  # True: a new version of the run's checkpoint (to be) created
    alias: str
    old_version: str | None  # the alias's holder before, None if it had none
    previous_alias: str
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        """Whether a version is (to be) registered or the alias (to be) moved."""
        return self.registered or self.old_version != self.version

    def lines(self) -> list[str]:
        """Human-readable lines describing the change."""
        would = "would " if self.dry_run else ""
        version = f"v{self.version}" if self.version else "the new version"
        out = [f"best run: {self.run_id} ({self.run_name}), {self.metric}={self.value:g}"]
        if self.registered:
            registered = "register a new version" if self.version is None else f"registered version {self.version}"
            out.append(f"{would}{registered} of {self.model} from run {self.run_id} ({self.metric}={self.value:g})")
        else:
            out.append(f"{self.model} version {self.version} already holds run {self.run_id}'s checkpoint")
        if not self.changed:
            out.append(f"alias {self.alias} already points at v{self.version}: nothing changed")
            return out
        old = f"v{self.old_version}" if self.old_version else "(none)"
        out.append(f"{would}set alias {self.alias}: {old} -> {version}")
        if self.old_version:
            out.append(f"{would}set alias {self.previous_alias}: v{self.old_version}")
            out.append(f"{would}tag {version}: {previous_tag(self.alias)}={self.old_version}")
        if self.dry_run:
            out.append("dry run: nothing changed")
        return out


def previous_alias(alias: str) -> str:
    """The alias that receives ``alias``'s former holder: ``previous`` for ``champion``, else ``<alias>-previous``."""
    return "previous" if alias == DEFAULT_ALIAS else f"{alias}-previous"


def previous_tag(alias: str) -> str:
    """The model-version tag recording which version held ``alias`` before it."""
    return f"pretrainlab.previous_{alias}"


def open_store(uri: str) -> MlflowClient:
    """A client for ``uri``; fails with :class:`TrackingError` when the store is unreachable or missing.

    A sqlite file that does not exist is an error here (MLflow would create an empty store).
    """
    check_tracking(uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(f"tracking store {uri}: no such file")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``; an unknown name raises, listing a few that exist."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments(max_results=20))
        raise PromotionError(f"unknown experiment {name!r} (experiments: {', '.join(known) or 'none'})")
    return experiment.experiment_id


def metric_names(client: MlflowClient, exp_id: str, limit: int = 200) -> list[str]:
    """Metric names logged by the experiment's most recent FINISHED runs (up to ``limit`` runs)."""
    runs = client.search_runs([exp_id], "attributes.status = 'FINISHED'", max_results=limit)
    return sorted({key for run in runs for key in run.data.metrics})


def find_best_run(client: MlflowClient, exp_id: str, metric: str, mode: str = "max", filter_string: str = "") -> Run:
    """The FINISHED run with the highest (``mode="max"``) or lowest value of ``metric``.

    ``filter_string`` (MLflow search syntax) narrows the candidates. Runs of
    ``jobs/evaluate.py`` never compete; ties go to the earliest run.
    """
    if mode not in ("max", "min"):
        raise PromotionError(f"mode must be 'max' or 'min', not {mode!r}")
    if "`" in metric:
        raise PromotionError(f"metric name {metric!r} contains a backtick")
    # `>= -1e999` (minus infinity) holds for every logged value except NaN: the metric exists
    clauses = ["attributes.status = 'FINISHED'", f"metrics.`{metric}` >= -1e999", f"tags.`{EVALUATION_TAG}` IS NULL"]
    if filter_string.strip():
        clauses.append(filter_string.strip())
    order = [f"metrics.`{metric}` {'DESC' if mode == 'max' else 'ASC'}", "attributes.start_time ASC"]
    try:
        runs = client.search_runs([exp_id], " and ".join(clauses), order_by=order, max_results=1)
    except MlflowException as err:
        if filter_string.strip() and err.error_code == "INVALID_PARAMETER_VALUE":
            raise PromotionError(f"bad --filter {filter_string!r}: {err.message}") from None
        raise
    if not runs:
        where = f" matching {filter_string.strip()!r}" if filter_string.strip() else ""
        names = metric_names(client, exp_id)
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "none"
        raise PromotionError(f"no FINISHED run{where} has the metric {metric!r} (metrics in this experiment: {shown})")
    return runs[0]


def has_checkpoint(client: MlflowClient, run_id: str) -> bool:
    """Whether the run logged a non-empty ``checkpoint`` artifact folder."""
    return bool(client.list_artifacts(run_id, CHECKPOINT_ARTIFACT))


def model_name_for(run: Run, model: str | None = None) -> str:
    """``model``, else the run's ``runtime.registered_model`` param; raises when neither is set."""
    name = model or run.data.params.get(MODEL_PARAM)
    if not name or name == "null":  # the flattened config logs an unset name as JSON null
        raise PromotionError(f"run {run.info.run_id} has no {MODEL_PARAM} param: name the model with --model")
    return name


def alias_holder(client: MlflowClient, model: str, alias: str) -> ModelVersion | None:
    """The version of ``model`` that ``alias`` points at, or None (also when the model does not exist)."""
    try:
        return client.get_model_version_by_alias(model, alias)
    except MlflowException as err:
        if err.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


class ModelSourceError(ValueError):
    """A ``models:/`` source names no version in the registry; the message names the source and the store."""


@dataclass(frozen=True)
class ResolvedSource:
    """What a model source names now (:func:`resolve_model_source`)."""

    source: str  # as given
    uri: str  # pinned models:/NAME/VERSION for a registry source, else the source as given
    name: str | None = None  # the registered model; None for runs:/ URIs and folders
    version: str | None = None
    alias: str | None = None  # the alias given, or champion when a bare models:/NAME resolved to it
    watch: bool = False  # an alias or bare models:/NAME: it can move to another version


def served_version(client: MlflowClient, model: str) -> ModelVersion | None:
    """The version a bare ``models:/NAME`` names: the ``champion`` alias's, else the latest; None if none."""
    holder = alias_holder(client, model, DEFAULT_ALIAS)
    if holder is not None:
        return holder
    versions = [v for v in client.search_model_versions(f"name='{model}'") if v.status != "FAILED_REGISTRATION"]
    return max(versions, key=lambda v: int(v.version), default=None)


def resolve_model_source(source: str | os.PathLike, tracking_uri: str | None = None) -> ResolvedSource:
    """Pin a model source to the version it names now.

    ``models:/NAME@alias`` and bare ``models:/NAME`` are looked up in the registry; ``models:/NAME/3``
    is pinned already and, like ``runs:/`` URIs and folders, needs no store.

    Args:
        source: ``models:/NAME@alias``, ``models:/NAME/3``, ``models:/NAME``, ``runs:/ID/path`` or a folder.
        tracking_uri: The MLflow store; default: ``$MLFLOW_TRACKING_URI``, else the project's.

    Raises:
        ModelSourceError: the alias or the model (or any version of it) is not in the registry.
        TrackingError: the store cannot be reached; the message names the source and the store.
    """
    text = os.fspath(source)
    pinned = _VERSION_URI.fullmatch(text)
    if pinned:
        return ResolvedSource(text, text, pinned.group(1), pinned.group(2))
    aliased, bare = _ALIAS_URI.fullmatch(text), _BARE_URI.fullmatch(text)
    if not (aliased or bare):
        return ResolvedSource(text, text)
    store = resolve_tracking_uri(tracking_uri)
    try:
        client = open_store(store)
    except TrackingError as err:
        raise TrackingError(f"{text}: {err}") from None
    if aliased:
        name, alias = aliased.groups()
        version = alias_holder(client, name, alias)
        if version is None:
            raise ModelSourceError(f"{text}: model {name!r} has no version with alias {alias!r} in {store}")
    else:
        name = bare.group(1)
        version = served_version(client, name)
        if version is None:
            raise ModelSourceError(f"{text}: no such registered model, or no version of it, in {store}")
        alias = DEFAULT_ALIAS if DEFAULT_ALIAS in (version.aliases or []) else None
    return ResolvedSource(text, f"models:/{name}/{version.version}", name, str(version.version), alias, True)


def existing_version(client: MlflowClient, model: str, run_id: str, prefer: str | None = None) -> ModelVersion | None:
    """A version of ``model`` registered from run ``run_id``: version ``prefer`` if it is one, else the newest."""
    # the name is compared here rather than in the filter, where quotes in a name cannot be escaped
    found = [
        v
        for v in client.search_model_versions(f"run_id='{run_id}'")
        if v.name == model and v.status != "FAILED_REGISTRATION"
    ]
    for v in found:
        if prefer is not None and str(v.version) == str(prefer):
            return v
    return max(found, key=lambda v: int(v.version), default=None)


def ensure_version(
    client: MlflowClient, model: str, run_id: str, prefer: str | None = None
) -> tuple[ModelVersion, bool]:
    """The version of ``model`` holding run ``run_id``'s checkpoint, registered if there is none yet.

    Returns:
        ``(version, created)``.
    """
    version = existing_version(client, model, run_id, prefer)
    if version is not None:
        return version, False
    return register_checkpoint(client, run_id, model), True


def set_alias_with_previous(client: MlflowClient, model: str, alias: str, version: str) -> str | None:
    """Point ``alias`` at ``version``; its former holder gets the previous alias and is recorded in a tag.

    Returns:
        The former holder's version number, or None when the alias was free or already there.
    """
    old = alias_holder(client, model, alias)
    if old is not None and str(old.version) == str(version):
        return None
    client.set_registered_model_alias(model, alias, str(version))
    if old is None:
        return None
    client.set_registered_model_alias(model, previous_alias(alias), str(old.version))
    client.set_model_version_tag(model, str(version), previous_tag(alias), str(old.version))
    return str(old.version)


def check_alias(alias: str) -> None:
    """Fail before changing anything when MLflow would refuse ``alias``."""
    if not _ALIAS.fullmatch(alias) or _RESERVED_ALIAS.fullmatch(alias):
        raise PromotionError(f"bad alias {alias!r}: use letters, digits, '_' and '-', and not 'latest' or 'v<number>'")


def promote(
    client: MlflowClient,
    experiment: str,
    metric: str,
    mode: str = "max",
    alias: str = DEFAULT_ALIAS,
    model: str | None = None,
    filter_string: str = "",
    dry_run: bool = False,
) -> Promotion:
    """Point ``alias`` of the registered model at the checkpoint of the experiment's best run.

    Raises:
        PromotionError: unknown experiment, no candidate run, a best run without a
            checkpoint artifact, no model name, a bad filter or alias.
    """
    check_alias(alias)
    run = find_best_run(client, experiment_id(client, experiment), metric, mode, filter_string)
    run_id = run.info.run_id
    if not has_checkpoint(client, run_id):
        raise PromotionError(
            f"the best run by {metric} ({mode}), {run_id} ({run.info.run_name}), has no "
            f"{CHECKPOINT_ARTIFACT!r} artifact; narrow the candidates with --filter"
        )
    name = model_name_for(run, model)
    holder = alias_holder(client, name, alias)
    holder_version = str(holder.version) if holder is not None else None
    promotion = Promotion(
        run_id=run_id,
        run_name=run.info.run_name,
        metric=metric,
        value=run.data.metrics[metric],
        model=name,
        version=None,
        registered=False,
        alias=alias,
        old_version=holder_version,
        previous_alias=previous_alias(alias),
        dry_run=dry_run,
    )
    if dry_run:
        found = existing_version(client, name, run_id, prefer=holder_version)
        promotion.version = str(found.version) if found is not None else None
        promotion.registered = found is None
        return promotion
    version, promotion.registered = ensure_version(client, name, run_id, prefer=holder_version)
    promotion.version = str(version.version)
    set_alias_with_previous(client, name, alias, promotion.version)
    return promotion

"""pretrainlab.tracking.registry.resolve_model_source against a real MLflow sqlite store (no mocks).

Model ``digits``: v1 (``champion``), v2 (``staging``), v3. Model ``plain``: v1, v2, no alias. Model ``empty``:
registered, no version.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from pretrainlab.tracking.mlflow import TrackingError
from pretrainlab.tracking.registry import ModelSourceError, ResolvedSource, resolve_model_source


@pytest.fixture
def registry(project: Path, tmp_path: Path) -> SimpleNamespace:
    """The project's store with the registered models of the module docstring."""
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name, versions in (("digits", 3), ("plain", 2), ("empty", 0)):
        client.create_registered_model(name)
        for version in range(1, versions + 1):
            folder = tmp_path / f"{name}-v{version}"
            folder.mkdir()
            client.create_model_version(name, source=str(folder))
    client.set_registered_model_alias("digits", "champion", "1")
    client.set_registered_model_alias("digits", "staging", "2")
    return SimpleNamespace(uri=uri, client=client, home=project)


def test_alias_pins_the_version_it_points_at(registry):
    resolved = resolve_model_source("models:/digits@staging")
    assert resolved == ResolvedSource(
        source="models:/digits@staging", uri="models:/digits/2", name="digits", version="2", alias="staging", watch=True
    )
    registry.client.set_registered_model_alias("digits", "staging", "3")  # the alias moves: so does the pin
    assert resolve_model_source("models:/digits@staging").uri == "models:/digits/3"


def test_version_is_pinned_already_and_needs_no_store(registry, tmp_path):
    no_store = f"sqlite:///{tmp_path}/no-such.db"
    resolved = resolve_model_source("models:/digits/3", tracking_uri=no_store)
    assert resolved == ResolvedSource("models:/digits/3", "models:/digits/3", "digits", "3", None, False)


def test_bare_name_is_the_champion(registry):
    resolved = resolve_model_source("models:/digits")  # v3 is the latest; champion holds v1
    assert (resolved.uri, resolved.name, resolved.version, resolved.alias, resolved.watch) == (
        "models:/digits/1",
        "digits",
        "1",
        "champion",
        True,
    )
    assert resolve_model_source("models:/digits/").uri == "models:/digits/1"


def test_bare_name_without_champion_is_the_latest_version(registry):
    resolved = resolve_model_source("models:/plain", tracking_uri=registry.uri)
    assert (resolved.uri, resolved.version, resolved.alias, resolved.watch) == ("models:/plain/2", "2", None, True)
    registry.client.create_model_version("plain", source=str(registry.home))
    assert resolve_model_source("models:/plain").uri == "models:/plain/3"


def test_runs_uris_and_folders_pass_through_without_a_store(tmp_path):
    no_store = f"sqlite:///{tmp_path}/no-such.db"
    run = resolve_model_source("runs:/0123abcd/checkpoint", tracking_uri=no_store)
    assert run == ResolvedSource("runs:/0123abcd/checkpoint", "runs:/0123abcd/checkpoint")
    assert (run.name, run.version, run.alias, run.watch) == (None, None, None, False)
    folder = resolve_model_source(tmp_path, tracking_uri=no_store)  # an os.PathLike too
    assert folder == ResolvedSource(str(tmp_path), str(tmp_path))


def test_unknown_alias_names_the_source_and_the_store(registry):
    with pytest.raises(ModelSourceError) as raised:
        resolve_model_source("models:/digits@nightly")
    assert (
        str(raised.value)
        == f"models:/digits@nightly: model 'digits' has no version with alias 'nightly' in {registry.uri}"
    )
    assert isinstance(raised.value, ValueError)
    with pytest.raises(ModelSourceError, match="model 'nope' has no version with alias 'champion'"):
        resolve_model_source("models:/nope@champion")


def test_unknown_model_or_no_version_names_the_source_and_the_store(registry):
    message = "models:/{}: no such registered model, or no version of it, in {}"
    with pytest.raises(ModelSourceError) as raised:
        resolve_model_source("models:/nope")
    assert str(raised.value) == message.format("nope", registry.uri)
    with pytest.raises(ModelSourceError) as raised:
        resolve_model_source("models:/empty")
    assert str(raised.value) == message.format("empty", registry.uri)


def test_missing_store_is_a_tracking_error_naming_the_source_and_the_store(registry, tmp_path):
    no_store = f"sqlite:///{tmp_path}/no-such.db"
    with pytest.raises(TrackingError) as raised:
        resolve_model_source("models:/digits@champion", tracking_uri=no_store)
    assert str(raised.value) == f"models:/digits@champion: tracking store {no_store}: no such file"
    assert not (tmp_path / "no-such.db").exists()  # no empty store made on the way

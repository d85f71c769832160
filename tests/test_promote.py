"""jobs/promote.py against a real MLflow sqlite store: runs made directly with MlflowClient."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import free_port
from pretrainlab.tracking.mlflow import client_for, ensure_experiment, register_checkpoint
from pretrainlab.tracking.registry import previous_tag

EXPERIMENT = "promote-test"
MODEL = "fmnist-classifier"


@pytest.fixture
def client(project) -> MlflowClient:
    client = client_for(os.environ["MLFLOW_TRACKING_URI"])
    ensure_experiment(client, EXPERIMENT)
    return client


def make_run(
    client: MlflowClient,
    top1: float | None,
    *,
    checkpoint: bool = True,
    strategy: str = "supervised",
    status: str = "FINISHED",
    tags: dict[str, str] | None = None,
) -> str:
    """A run of the experiment as jobs/pretrain.py leaves it: params, val/top1, a checkpoint folder."""
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    run_id = client.create_run(experiment_id, tags={"strategy": strategy, **(tags or {})}).info.run_id
    client.log_param(run_id, "runtime.registered_model", MODEL)
    if top1 is not None:
        client.log_metric(run_id, "val/top1", top1)
    client.log_metric(run_id, "val/loss", 1.0 - (top1 or 0.0))
    if checkpoint:
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "config.json").write_text("{}")
            client.log_artifacts(run_id, folder, "checkpoint")
    client.set_terminated(run_id, status)
    return run_id


def call(capsys, argv: list[str]) -> tuple[int, str, str]:
    """``jobs/promote.py ARGV``: exit code, stdout, stderr."""
    import promote as job  # jobs/ is on sys.path through conftest

    code = job.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_job(capsys, *args: str) -> tuple[int, str, str]:
    return call(capsys, ["--experiment", EXPERIMENT, "--metric", "val/top1", *args])


def versions(client: MlflowClient) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))


def holder(client: MlflowClient, alias: str) -> tuple[str, str]:
    version = client.get_model_version_by_alias(MODEL, alias)
    return str(version.version), version.run_id


def test_promote_registers_sets_champion_and_is_idempotent(client, capsys):
    make_run(client, 0.80)
    best = make_run(client, 0.90)
    make_run(client, 0.95, status="FAILED")  # not FINISHED: never a candidate
    make_run(client, None)  # no val/top1

    code, out, err = run_job(capsys)
    assert (code, err) == (0, "")
    assert f"registered version 1 of {MODEL} from run {best} (val/top1=0.9)" in out
    assert "set alias champion: (none) -> v1" in out
    assert holder(client, "champion") == ("1", best)

    code, out, _ = run_job(capsys)
    assert code == 0
    assert "already points at v1: nothing changed" in out
    assert versions(client) == ["1"]
    assert holder(client, "champion") == ("1", best)


def test_promote_reuses_the_version_the_training_job_registered(client, capsys):
    best = make_run(client, 0.90)
    register_checkpoint(client, best, MODEL)
    code, out, _ = run_job(capsys)
    assert code == 0
    assert f"{MODEL} version 1 already holds run {best}'s checkpoint" in out
    assert versions(client) == ["1"]
    assert holder(client, "champion") == ("1", best)


def test_a_better_run_takes_champion_and_the_old_one_becomes_previous(client, capsys):
    first = make_run(client, 0.80)
    assert run_job(capsys)[0] == 0
    second = make_run(client, 0.85)

    code, out, _ = run_job(capsys)
    assert code == 0
    assert "set alias champion: v1 -> v2" in out
    assert "set alias previous: v1" in out
    assert holder(client, "champion") == ("2", second)
    assert holder(client, "previous") == ("1", first)
    assert client.get_model_version(MODEL, "2").tags[previous_tag("champion")] == "1"


def test_dry_run_changes_nothing(client, capsys):
    make_run(client, 0.80)
    code, out, _ = run_job(capsys, "--dry-run")
    assert code == 0
    assert "would register a new version" in out and "dry run: nothing changed" in out
    assert versions(client) == []

    assert run_job(capsys)[0] == 0
    better = make_run(client, 0.90)
    code, out, _ = run_job(capsys, "--dry-run")
    assert code == 0
    assert f"would register a new version of {MODEL} from run {better}" in out
    assert "would set alias champion: v1 -> the new version" in out
    assert versions(client) == ["1"]
    assert holder(client, "champion")[0] == "1"
    with pytest.raises(Exception, match="not found"):
        client.get_model_version_by_alias(MODEL, "previous")


def test_filter_and_min_mode_choose_the_candidates(client, capsys):
    ssl = make_run(client, 0.70, strategy="ssl")
    make_run(client, 0.90, strategy="supervised")
    lowest = make_run(client, 0.60, strategy="supervised")

    code, out, _ = run_job(capsys, "--filter", "tags.strategy = 'ssl'", "--alias", "ssl-best")
    assert code == 0, out
    assert holder(client, "ssl-best")[1] == ssl

    code, out, _ = run_job(capsys, "--mode", "min", "--alias", "worst", "--model", "other-model")
    assert code == 0
    assert client.get_model_version_by_alias("other-model", "worst").run_id == lowest


def test_evaluation_runs_never_compete(client, capsys):
    best = make_run(client, 0.80)
    make_run(client, 0.99, checkpoint=False, tags={"pretrainlab.evaluated": "models:/m/1"})
    assert run_job(capsys)[0] == 0
    assert holder(client, "champion")[1] == best


def test_errors_exit_2_with_a_message(client, capsys):
    make_run(client, 0.80)
    no_checkpoint = make_run(client, 0.90, checkpoint=False)

    code, out, err = run_job(capsys)
    assert (code, out) == (2, "")
    assert err.startswith("error: ") and no_checkpoint in err and "no 'checkpoint' artifact" in err
    assert versions(client) == []  # no fall back to the second best

    code, _, err = call(capsys, ["--experiment", EXPERIMENT, "--metric", "val/top5"])
    assert code == 2 and "'val/top5'" in err and "val/loss" in err and "val/top1" in err

    code, _, err = call(capsys, ["--experiment", "nope", "--metric", "val/top1"])
    assert code == 2 and "unknown experiment 'nope'" in err and EXPERIMENT in err

    code, _, err = run_job(capsys, "--filter", "tags.strategy = ssl")
    assert code == 2 and err.startswith("error: bad --filter") and "quote" in err

    code, _, err = run_job(capsys, "--tracking-uri", f"{client.tracking_uri}.missing")
    assert code == 2 and "no such file" in err

    code, _, err = run_job(capsys, "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and "cannot reach the MLflow tracking server" in err

    code, _, err = run_job(capsys, "--alias", "v3")
    assert code == 2 and "bad alias 'v3'" in err

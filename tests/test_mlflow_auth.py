"""MLflow's basic-auth app: a real ``mlflow server --app-name basic-auth`` on 127.0.0.1, used by PretrainLab's
tracking helpers with credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from mlflow.exceptions import MlflowException

from conftest import MlflowServer
from pretrainlab.tracking.mlflow import MetricLogger, TrackingError, check_tracking, client_for, start_or_resume_run

pytestmark = pytest.mark.needs_server

ADMIN = ("admin", "admin-password-for-tests")
TRAINER = ("trainer", "trainer-password-for-tests")
SEARCH = "/api/2.0/mlflow/experiments/search"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URI of an ``mlflow server --app-name basic-auth`` with users ``admin`` and ``trainer`` (READ by default)."""
    folder = tmp_path_factory.mktemp("mlflow_auth")
    config = folder / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{folder / 'auth.db'}\n"
        f"admin_username = {ADMIN[0]}\n"
        f"admin_password = {ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": "secret-key-for-tests"}
    args = ["--app-name", "basic-auth", "--default-artifact-root", (folder / "artifacts").as_uri()]
    with MlflowServer(folder, f"sqlite:///{folder / 'mlflow.db'}", *args, env=env) as server:
        created = httpx.post(
            f"{server.uri}/api/2.0/mlflow/users/create",
            auth=ADMIN,
            json={"username": TRAINER[0], "password": TRAINER[1]},
        )
        assert created.status_code == 200, created.text
        yield server.uri


@pytest.fixture
def credentials(monkeypatch):
    """Sets (or, given None, unsets) MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD for one test."""

    def use(user: tuple[str, str] | None) -> None:
        for name, value in zip(
            ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"], user or (None, None), strict=True
        ):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    return use


def test_rest_calls_need_credentials(server):
    params = {"max_results": 1}
    anonymous = httpx.get(f"{server}{SEARCH}", params=params)
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == 'Basic realm="mlflow"'
    assert httpx.get(f"{server}{SEARCH}", params=params, auth=(TRAINER[0], "wrong-password-xx")).status_code == 401
    assert httpx.get(f"{server}{SEARCH}", params=params, auth=TRAINER).status_code == 200
    assert httpx.get(f"{server}{SEARCH}", params=params, auth=ADMIN).json()["experiments"][0]["name"] == "Default"
    assert httpx.get(f"{server}/health").status_code == 200  # a health check alone cannot tell


def test_jobs_log_a_run_with_credentials_from_the_environment(server, credentials, tmp_path):
    credentials(TRAINER)
    check_tracking(server)
    client = client_for(server)
    run_id, resumed = start_or_resume_run(client, "auth", "trainer-run", {"strategy": "supervised"})
    logger = MetricLogger(client, run_id, outbox_dir=tmp_path / "outbox")
    for step in range(3):
        logger.log({"train/loss": 1.0 / (step + 1), "train/lr": 0.1}, step)
    assert not resumed and not logger.outbox.path.exists()  # sent, not queued

    credentials(ADMIN)  # read back by another user: the run is on the server
    history = client_for(server).get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert client_for(server).get_run(run_id).data.tags["strategy"] == "supervised"


def test_check_tracking_without_or_with_wrong_credentials_names_the_variables(server, credentials):
    credentials(None)
    with pytest.raises(TrackingError) as missing:
        check_tracking(server)
    assert str(missing.value) == (
        f"the MLflow tracking server at {server} needs credentials: set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD (HTTP 401)"
    )
    credentials((TRAINER[0], "wrong-password-xx"))
    with pytest.raises(TrackingError, match="refused the credentials in MLFLOW_TRACKING_USERNAME and MLFLOW_TRACK"):
        check_tracking(server)


def test_refused_credentials_during_training_raise_instead_of_queueing(server, credentials, tmp_path):
    credentials(TRAINER)
    client = client_for(server)
    run_id, _ = start_or_resume_run(client, "auth", "expired-password-run", {})
    logger = MetricLogger(client, run_id, outbox_dir=tmp_path / "outbox")
    credentials((TRAINER[0], "wrong-password-xx"))
    with pytest.raises(MlflowException) as refused:
        logger.log({"train/loss": 1.0}, 0)
    assert refused.value.get_http_status_code() == 401
    assert not Path(logger.outbox.path).exists()  # an outage is queued; a refusal is not

"""The team MLflow set-up: a real ``mlflow server`` whose backend store is PostgreSQL (a throwaway cluster of
Debian's postgresql on 127.0.0.1), artifacts on an S3-compatible server (moto's server mode on 127.0.0.1) that the
server serves. A training run, a sweep and a promotion go through it; a second process resolves the registry alias;
the rows are read back from PostgreSQL and the artifacts from the bucket."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import psycopg2
import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from psycopg2 import sql

from conftest import BUCKET, CONFIGS, MlflowServer, free_port
from pretrainlab.tracking.mlflow import RUN_NAME_TAG

pytestmark = pytest.mark.needs_server

CONFIG = str(CONFIGS / "test-resnet_2xb32_digits.yaml")
ASHA = str(CONFIGS / "sweeps" / "test-resnet_digits_asha.yaml")
MODEL = "digits-classifier"
DB, USER, PASSWORD = "mlflow", "mlflow", "a password for the tests"
ARTIFACTS = "mlflow-pg"  # the key prefix of the artifacts in ``BUCKET``


def postgres_bin() -> Path:
    """The folder of PostgreSQL's ``initdb`` and ``postgres`` (Debian: the newest /usr/lib/postgresql/N/bin)."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres") if p.parent.parent.name.isdigit()]
    if found:
        return max(found, key=lambda folder: int(folder.parent.name))
    on_path = shutil.which("postgres")
    if on_path and shutil.which("initdb", path=str(Path(on_path).parent)):
        return Path(on_path).parent
    pytest.fail(
        "PostgreSQL's server programs (initdb, postgres) are not installed: neither /usr/lib/postgresql/*/bin "
        "nor PATH has them. Run scripts/setup.sh, which installs Debian's postgresql package.",
        pytrace=False,
    )


@dataclass
class Postgres:
    port: int
    socket_dir: Path

    @property
    def uri(self) -> str:
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg (3); the project installs psycopg2
        return f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DB}"

    def connect(self, user: str = USER, password: str | None = PASSWORD, dbname: str = DB, host: str = "127.0.0.1"):
        return psycopg2.connect(host=host, port=self.port, user=user, password=password, dbname=dbname)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster in a temporary folder: TCP on 127.0.0.1 only (password auth), its unix socket in that
    folder; database ``mlflow`` owned by the user ``mlflow``. Run as ``postgres`` when the tests run as root."""
    bin_dir = postgres_bin()
    base = Path(tempfile.mkdtemp(prefix="pretrainlab-pg-"))  # under /tmp, which the postgres user can enter
    as_root = os.geteuid() == 0
    run_as = {"user": "postgres", "group": "postgres", "extra_groups": []} if as_root else {}
    process = None
    try:
        if as_root:  # initdb and postgres refuse to run as root
            shutil.chown(base, "postgres", "postgres")
        data = base / "data"
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust"]
        initdb += ["--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"]
        done = subprocess.run(initdb, cwd=base, capture_output=True, text=True, timeout=120, **run_as)
        assert done.returncode == 0, f"initdb failed:\n{done.stdout}\n{done.stderr}"

        port = free_port()
        command = [str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(base)]
        command += ["-c", "fsync=off"]  # a throwaway cluster
        log_path = base / "postgres.log"  # opened here, written by the server
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=base, stdout=log, stderr=subprocess.STDOUT, **run_as)
        server = Postgres(port, base)
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"PostgreSQL on 127.0.0.1:{port} did not accept connections in 60 s"
            try:
                admin = server.connect("postgres", None, "postgres", host=str(base))  # unix socket, trust
                break
            except psycopg2.OperationalError:
                time.sleep(0.2)
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(USER)), [PASSWORD])
            cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DB), sql.Identifier(USER)))
        admin.close()
        yield server
    finally:
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGINT)  # the postmaster: fast shutdown
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGQUIT)  # immediate shutdown
                process.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, s3, tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 over the PostgreSQL store, serving artifacts from ``s3://BUCKET/ARTIFACTS``.
    Yields its URI."""
    folder = tmp_path_factory.mktemp("mlflow_pg")
    artifacts = f"s3://{BUCKET}/{ARTIFACTS}"  # the server reads the AWS variables of s3
    with MlflowServer(folder, postgres.uri, artifacts=artifacts, workers=2) as server:  # creates MLflow's tables
        yield server.uri


@pytest.fixture(scope="module")
def team(mlflow_server, tmp_path_factory):
    """Jobs of this module log to the server: MLFLOW_TRACKING_URI and a project folder of their own."""
    home = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_REGISTRY_URI"):
            patch.delenv(name, raising=False)
        patch.setenv("PRETRAINLAB_HOME", str(home))
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        yield mlflow_server


@pytest.fixture(scope="module")
def _ray(team, local_ray):
    """One local Ray for the module, started once the environment points at the server."""
    return local_ray


def test_postgres_listens_on_127_0_0_1_and_wants_the_password(postgres):
    with postgres.connect() as conn, conn.cursor() as cursor:
        cursor.execute("SELECT current_user, current_database(), inet_server_addr()::text, version()")
        user, db, address, version = cursor.fetchone()
    conn.close()
    assert (user, db, address.split("/")[0]) == (USER, DB, "127.0.0.1") and version.startswith("PostgreSQL ")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        postgres.connect(password="not the password")


def rows(postgres: Postgres, query: str, *args) -> list[tuple]:
    with postgres.connect() as conn, conn.cursor() as cursor:
        cursor.execute(query, args)
        found = cursor.fetchall()
    conn.close()
    return found


@pytest.mark.needs_ray
def test_train_sweep_promote_through_a_postgres_backed_server(_ray, team, postgres, tmp_path, capsys):
    import pretrain as pretrain_job
    import promote as promote_job  # jobs/ is on sys.path through conftest
    import sweep as sweep_job

    # (1) a training run
    assert pretrain_job.main([CONFIG, "--run-name", "pg-train", "--set", "train.epochs=1"]) == 0
    assert f"store {team}" in capsys.readouterr().out
    client = MlflowClient()
    assert client.tracking_uri == team
    experiment_id = client.get_experiment_by_name("digits").experiment_id
    train_run = client.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = 'pg-train'")[0]
    assert train_run.info.status == "FINISHED" and train_run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert train_run.data.params["model.backbone"] == "test_resnet" and train_run.data.tags["config.hash"]
    train_loss = client.get_metric_history(train_run.info.run_id, "train/loss")
    assert train_loss and 0.0 <= train_run.data.metrics["test/top1"] <= 100.0  # 1 epoch: no quality bar
    assert {"checkpoint", "config.yaml", "evaluation"} <= {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert [v.run_id for v in client.search_model_versions(f"name = '{MODEL}'")] == [train_run.info.run_id]
    stored_at = f"{ARTIFACTS}/{train_run.info.artifact_uri.removeprefix('mlflow-artifacts:/')}/checkpoint/"
    listed = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=stored_at)
    assert f"{stored_at}model.safetensors" in {o["Key"] for o in listed.get("Contents", [])}  # through the server

    # (2) a sweep: 2 trials of 1 epoch, side by side
    space = "sweep.space={optim.lr: {grid: [0.05, 0.1]}}"
    overrides = [space, "sweep.num_samples=1", "sweep.scheduler.type=none", "train.epochs=1"]
    assert sweep_job.main([ASHA, "--name", "pg-sweep", *[arg for o in overrides for arg in ("--set", o)]]) == 0
    runs = client.search_runs([experiment_id])
    parent = next(r for r in runs if r.data.tags[RUN_NAME_TAG] == "pg-sweep")
    children = [r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id]
    assert len(runs) == 4 and len(children) == 2 and parent.info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" and "best/val/top1" in c.data.metrics for c in children)
    assert parent.data.metrics["sweep/trials"] == 2
    assert "sweep/results.csv" in {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}

    # (3) a promotion over all of them
    candidates = [train_run.info.run_id, *(c.info.run_id for c in children)]
    by_id = {r.info.run_id: r for r in client.search_runs([experiment_id])}
    best = max(candidates, key=lambda i: (by_id[i].data.metrics["best/val/top1"], -by_id[i].info.start_time))
    capsys.readouterr()
    argv = ["--experiment", "digits", "--metric", "best/val/top1", "--model", MODEL, "--alias", "champion"]
    assert promote_job.main(argv) == 0
    out = capsys.readouterr().out
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.run_id == best, out
    assert f"set alias champion: (none) -> v{champion.version}" in out

    # (4) a second process resolves models:/NAME@champion through the server, with an empty project folder
    code = (
        "import json, sys\n"
        "from mlflow import MlflowClient\n"
        "import pretrainlab\n"
        "client = MlflowClient()\n"
        "version = client.get_model_version_by_alias(sys.argv[1], 'champion')\n"
        "run = client.get_run(version.run_id)\n"
        "model = pretrainlab.get_model(f'models:/{sys.argv[1]}@champion', device='cpu')\n"
        "print(json.dumps({'uri': client.tracking_uri, 'version': version.version, 'run_id': version.run_id,\n"
        "    'metrics': run.data.metrics, 'meta_run_id': model.info.meta.get('mlflow_run_id'),\n"
        "    'classes': len(model.info.class_names)}))\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # MLFLOW_TRACKING_URI of ``team`` and the AWS variables of ``s3`` come from os.environ; the model is read
    # through the server, which holds the bucket
    env = {**os.environ, "PRETRAINLAB_HOME": str(elsewhere)}
    done = subprocess.run(
        [sys.executable, "-c", code, MODEL], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert (seen["uri"], seen["version"], seen["run_id"]) == (team, str(champion.version), best)
    assert seen["metrics"]["best/val/top1"] == by_id[best].data.metrics["best/val/top1"]
    assert seen["metrics"]["val/top1"] == by_id[best].data.metrics["val/top1"]
    assert seen["meta_run_id"] == best and seen["classes"] == 10

    # the rows are in PostgreSQL itself, not in a store the server fell back to
    stored = dict(
        rows(
            postgres,
            "SELECT r.run_uuid, r.status FROM runs r JOIN experiments e USING (experiment_id) WHERE e.name = 'digits'",
        )
    )
    assert stored == {r.info.run_id: "FINISHED" for r in runs}
    history = rows(
        postgres,
        "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'train/loss' ORDER BY step, timestamp",
        train_run.info.run_id,
    )
    assert history == [(m.step, m.value) for m in sorted(train_loss, key=lambda m: (m.step, m.timestamp))]
    latest = rows(postgres, "SELECT value FROM latest_metrics WHERE run_uuid = %s AND key = 'best/val/top1'", best)
    assert latest == [(by_id[best].data.metrics["best/val/top1"],)]
    aliases = rows(postgres, "SELECT name, version FROM registered_model_aliases WHERE alias = 'champion'")
    assert aliases == [(MODEL, int(champion.version))]

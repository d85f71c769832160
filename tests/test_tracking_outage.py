"""MLflow outages: a real ``mlflow server`` is stopped and restarted while metrics are logged; none is lost."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from conftest import MlflowServer, free_port
from pretrainlab.tracking.mlflow import MetricLogger, client_for
from pretrainlab.tracking.outbox import Outbox, OutboxError, main, outbox_path


@pytest.fixture
def servers(tmp_path):
    """Makes ``mlflow server`` instances (not started) over one sqlite store; stops them after the test."""
    made: list[MlflowServer] = []

    def make() -> MlflowServer:
        artifacts = (tmp_path / "artifacts").as_uri()
        made.append(MlflowServer(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", "--default-artifact-root", artifacts))
        return made[-1]

    yield make
    for server in made:
        server.stop()


def _new_run(uri: str) -> str:
    client = client_for(uri)
    experiment = client.create_experiment("outage")
    return client.create_run(experiment).info.run_id


def _history(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client_for(uri).get_metric_history(run_id, key))


@pytest.mark.needs_server
def test_metrics_logged_while_the_server_is_down_are_flushed_when_it_returns(servers, tmp_path, capsys):
    server = servers().start()
    run_id = _new_run(server.uri)
    logger = MetricLogger(client_for(server.uri), run_id, outbox_dir=tmp_path / "outbox", retry_every_s=0)
    durations = {}
    for step in range(10):
        if step == 3:
            server.stop()
        if step == 7:
            server.start()
        start = time.perf_counter()
        logger.log({"train/loss": 1.0 / (step + 1), "train/lr": 0.1}, step)
        durations[step] = time.perf_counter() - start

    assert max(durations.values()) < 5, durations
    assert not logger.outbox.path.exists()
    assert _history(server.uri, run_id, "train/loss") == list(range(10))
    assert _history(server.uri, run_id, "train/lr") == list(range(10))
    out = capsys.readouterr().out
    assert f"MLflow at {server.uri} unreachable" in out and str(logger.outbox.path) in out
    assert "flushed 10 queued metrics" in out  # steps 3..7, two metrics each: step 7 joins the queue, then it is sent
    print(f"failing log calls took at most {max(durations[s] for s in range(3, 7)):.3f} s")

    with pytest.raises(MlflowException, match="not found|does not exist"):  # not an outage: still an error
        MetricLogger(client_for(server.uri), "0" * 32, outbox_dir=tmp_path / "outbox").log({"loss": 1.0}, 0)
    assert not (tmp_path / "outbox" / f"{'0' * 32}.jsonl").exists()


@pytest.mark.needs_server
def test_metrics_queued_when_the_server_never_returns_are_replayed_by_the_command(servers, tmp_path, capsys):
    first = servers().start()
    run_id = _new_run(first.uri)
    folder = tmp_path / "outbox"
    logger = MetricLogger(client_for(first.uri), run_id, outbox_dir=folder, retry_every_s=3600)
    logger.log({"loss": 0.0}, 0)
    first.stop()
    for step in range(1, 6):
        logger.log({"loss": float(step), "acc": step / 10}, step)
    path = outbox_path(run_id, folder)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    logged_at = {r["step"]: r["timestamp"] for r in records}
    copy = tmp_path / "copy.jsonl"
    shutil.copy(path, copy)

    second = servers().start()  # another server on the same store
    assert main(["replay", str(folder), "--tracking-uri", second.uri]) == 0
    assert not path.exists()
    history = client_for(second.uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4, 5]
    assert {m.step: m.timestamp for m in history if m.step} == logged_at
    assert "replayed 10 metrics" in capsys.readouterr().out

    shutil.copy(copy, path)  # replaying the same records again (here straight into the sqlite store) adds nothing
    assert main(["replay", str(path), "--tracking-uri", second.backend_store]) == 0
    assert not path.exists()
    assert _history(second.uri, run_id, "loss") == [0, 1, 2, 3, 4, 5]
    assert _history(second.uri, run_id, "acc") == [1, 2, 3, 4, 5]


def test_a_failing_log_returns_fast_and_queues_on_disk(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    logger = MetricLogger(client_for(uri), "run0", outbox_dir=tmp_path, retry_every_s=0)
    start = time.perf_counter()
    for step in range(3):
        logger.log({"loss": 1.0}, step)
    assert time.perf_counter() - start < 5
    assert len(Outbox(tmp_path / "run0.jsonl")) == 3
    out = capsys.readouterr().out
    assert out.count("unreachable") == 1 and "Connection refused" in out


def test_tries_to_send_the_queue_are_spaced_and_back_off(tmp_path):
    client = client_for(f"http://127.0.0.1:{free_port()}")
    logger = MetricLogger(client, "run0", outbox_dir=tmp_path, retry_every_s=3600, max_retry_every_s=7200)
    tries = []
    send = logger.send
    logger.send = lambda metrics: (tries.append(len(metrics)), send(metrics))
    for step in range(5):
        logger.log({"loss": 1.0}, step)
    assert tries == [1]  # the first log call; the queue waits an hour before the next try
    logger._next_try = 0.0
    logger.log({"loss": 1.0}, 5)
    assert tries == [1, 6] and logger._interval == 7200


def test_the_outbox_lives_in_the_project_folder_unless_told(project, monkeypatch, tmp_path):
    client = client_for("http://127.0.0.1:1")
    assert MetricLogger(client, "run0").outbox.path == project / "outbox" / "run0.jsonl"
    monkeypatch.setenv("PRETRAINLAB_OUTBOX", str(tmp_path / "elsewhere"))
    assert MetricLogger(client, "run0").outbox.path == tmp_path / "elsewhere" / "run0.jsonl"


def test_the_outbox_is_bounded_and_says_what_it_dropped(tmp_path, capsys):
    logger = MetricLogger(client_for(f"http://127.0.0.1:{free_port()}"), "run0", outbox_dir=tmp_path, max_queued=2)
    for step in range(5):
        logger.log({"loss": 1.0}, step)
    assert [json.loads(line)["step"] for line in (tmp_path / "run0.jsonl").read_text().splitlines()] == [0, 1]
    assert logger.outbox.dropped == 3
    assert "is full (2 records): dropped the metrics of 1 log calls so far (latest: step 2)" in capsys.readouterr().out


def test_flush_sends_chunks_in_order_and_keeps_what_was_not_sent(tmp_path):
    outbox = Outbox(tmp_path / "run.jsonl")
    for step in range(3):
        outbox.append(step, 1000 + step, {f"m{i}": float(i) for i in range(600)})
    calls: list[list[Metric]] = []

    def fail_second(batch):
        if len(calls) == 1:
            raise ConnectionError("down")
        calls.append(batch)

    with pytest.raises(ConnectionError):
        outbox.flush(fail_second)
    assert [len(c) for c in calls] == [1000]
    # the first chunk ended inside step 1: steps 1 and 2 stay queued (step 1 is sent again, deduplicated by MLflow)
    assert [json.loads(line)["step"] for line in outbox.path.read_text().splitlines()] == [1, 2]
    assert len(outbox) == 2
    assert outbox.flush(calls.append) == 1200
    assert not outbox.path.exists()
    assert [(m.step, m.timestamp) for m in calls[-1][-1:]] == [(2, 1002)]


def test_a_corrupt_line_is_reported_with_its_file_and_line(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"step": 0, "timestamp": 1, "metrics": {"a": 1.0}}\n{"step": "x"}\n')
    with pytest.raises(OutboxError, match=rf"{path}, line 2: not a queued metric record"):
        Outbox(path).flush(lambda batch: None)
    assert path.exists()


def test_an_unfinished_last_line_is_cut_before_the_next_append(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    path.write_text('{"step": 0, "timestamp": 1, "metrics": {"a": 1.0}}\n{"step": 1, "time')
    outbox = Outbox(path)
    assert len(outbox) == 1
    outbox.append(2, 3, {"a": 2.0})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 2]
    assert "dropped an unfinished record" in capsys.readouterr().out


def test_replay_names_a_missing_target(tmp_path, capsys):
    from pretrainlab import cli

    missing = str(tmp_path / "nothing")
    assert cli.main(["outbox", "replay", missing, "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 1
    assert "no outbox file or folder at" in capsys.readouterr().err

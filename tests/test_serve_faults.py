"""The Serve application under faults and hostile bodies: a replica process killed by PID while a
bounded load runs, a 1 GB streamed body, deeply nested JSON. Real local Ray, real HTTP on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import CONFIGS, REPO, free_port, train_digits_checkpoint
from pretrainlab.config import load_config
from pretrainlab.data.builtin import prepare_builtin
from pretrainlab.data.dataset import load_split_numpy

pytestmark = pytest.mark.needs_ray

sys.path.insert(0, str(REPO))  # the serve/ application folder, as `serve run` from the repository root sees it

APP = "faults"
REQUEST_TIMEOUT_S = 20.0
LOAD_REQUESTS = 300
LOAD_THREADS = 6


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One checkpoint folder served by two replicas of the app; Serve and Ray shut down afterwards."""
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.schemas import ServeArgs

    home = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PRETRAINLAB_HOME", str(home))
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
        cfg = load_config(CONFIGS / "test-resnet_2xb32_digits.yaml")
        folder = prepare_builtin("digits", home / "data")
        checkpoint = train_digits_checkpoint(cfg, folder, home / "trained", steps=10)
        images, _ = load_split_numpy(folder, "test")

        ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = ServeArgs(
            models={"digits": str(checkpoint)},
            num_replicas=2,
            num_cpus=0.25,
            max_batch_size=4,
            max_ongoing_requests=16,
            max_body_bytes=200_000,
            request_timeout_s=REQUEST_TIMEOUT_S,
            alias_check_interval_s=0,
            torch_threads=1,
        )
        try:
            serve.run(build_app(args), name=APP, route_prefix="/")
            base_url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base_url, timeout=60) as http:
                yield SimpleNamespace(http=http, base_url=base_url, image=png(images[0, 0]))
        finally:
            serve.shutdown()
            ray.shutdown()


def replica_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:{APP}:ModelServer"), ("state", "=", "ALIVE")])
    return sorted(actor.pid for actor in actors)


def resent_calls() -> int:
    """How many calls the ingress replicas sent again after losing a model replica (from their logs)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return sum(f.read_text().count("attempt 1 of") for f in logs.glob(f"replica_{APP}_Ingress_*.log"))


def test_a_killed_replica_is_replaced_and_no_request_fails_or_hangs(served):
    body = {"image_base64": base64.b64encode(served.image).decode()}
    assert served.http.post("/v1/classify", json=body).status_code == 200
    before = replica_pids()
    assert len(before) == 2
    outcomes: list[tuple[int, float]] = []
    done = threading.Event()
    lock = threading.Lock()

    def call(_: int) -> None:
        start = time.monotonic()
        try:
            with httpx.Client(base_url=served.base_url, timeout=REQUEST_TIMEOUT_S + 10) as http:
                status = http.post("/v1/classify", json=body).status_code
        except httpx.HTTPError:
            status = -1  # no answer at all: a dropped connection or a hang past the client timeout
        with lock:
            outcomes.append((status, time.monotonic() - start))
            if len(outcomes) == LOAD_REQUESTS // 3:
                done.set()

    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        calls = pool.map(call, range(LOAD_REQUESTS))
        done.wait(timeout=300)
        os.kill(before[0], signal.SIGKILL)
        list(calls)

    statuses = Counter(status for status, _ in outcomes)
    slowest = max(t for _, t in outcomes)
    print(f"replica killed under load: {dict(statuses)}, {resent_calls()} sent again; slowest {slowest:.2f} s")
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= LOAD_REQUESTS - 50
    assert max(t for _, t in outcomes) < REQUEST_TIMEOUT_S + 5

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (len(replica_pids()) < 2 or before[0] in replica_pids()):
        time.sleep(0.5)
    after = replica_pids()
    assert len(after) == 2 and before[0] not in after and before[1] in after
    assert served.http.post("/v1/classify", json=body).status_code == 200


def raw_post(base_url: str, path: str, headers: dict[str, str], start: bytes) -> bytes:
    """The raw answer to a request that declares its headers but sends only ``start`` of its body."""
    host, port = httpx.URL(base_url).host, httpx.URL(base_url).port
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json", "Connection: close"]
    lines += [f"{key}: {value}" for key, value in headers.items()]
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + start)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                break
    return answer


def gigabyte(chunk: bytes = b" " * (1 << 20), count: int = 1024):
    """1 GiB of JSON whitespace, streamed chunk by chunk (never in memory at once)."""
    yield b"{"
    for _ in range(count):
        yield chunk


def test_a_1gb_body_is_refused_without_being_read(served):
    declared = raw_post(served.base_url, "/v1/classify", {"Content-Length": str(1 << 30)}, b"{")
    assert declared.startswith(b"HTTP/1.1 413") and b"max_body_bytes" in declared, declared[:300]

    start = time.monotonic()
    try:
        streamed = served.http.post("/v1/classify", content=gigabyte(), headers={"content-type": "application/json"})
        status, error = streamed.status_code, streamed.json()["error"]
    except httpx.HTTPError as err:  # the server answered and closed before the client finished sending
        status, error = 413, str(err)
    print(f"1 GiB chunked body: answered {status} in {time.monotonic() - start:.2f} s")
    assert status == 413 and ("max_body_bytes" in error or "closed" in error.lower()), error
    assert time.monotonic() - start < 30  # refused early: 1 GiB is not read through Serve
    good = {"image_base64": base64.b64encode(served.image).decode()}
    assert served.http.post("/v1/classify", json=good).status_code == 200


@pytest.mark.parametrize("depth", [1_000, 25_000])  # 25,000 levels: 175 kB, under max_body_bytes
def test_deeply_nested_json_is_a_422(served, depth):
    for body in (b"[" * depth + b"]" * depth, b'{"image_base64": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"):
        answer = served.http.post("/v1/classify", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422, answer.text[:300]
        assert isinstance(answer.json()["error"], str)
    assert served.http.get("/healthz").status_code == 200

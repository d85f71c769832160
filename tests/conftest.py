"""Shared fixtures: a real local Ray, a real MLflow sqlite store, a project folder per test, an S3 server."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import functools  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402
import ray.data  # noqa: E402, F401

# Ray Data's console log handler keeps the sys.stderr of the moment ray.data is first imported. Imported here, that
# is the session's stream; imported inside a test, it would be that test's capsys stream, closed after the test.

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
sys.path.insert(0, str(REPO / "jobs"))  # the jobs are scripts; tests call their main()


def wait_for(url: str, process: subprocess.Popen, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (Ray's dashboard wants its token: 401)
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def stop(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM the process we started (it shuts its children down), then SIGKILL anything left in its group."""
    process.terminate()
    try:
        process.wait(timeout_s)
    finally:
        kill_group(process)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group we started (``process`` leads it), and reap ``process``."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def start_server(command: list, log: Path, url: str, env: dict[str, str] | None = None, timeout_s: float = 90.0):
    """``command`` in its own process group, its output appended to ``log``, once ``url`` answers. Stop it with
    :func:`stop_group`."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(url, process, timeout_s)
    except BaseException:
        stop_group(process)
        print(log.read_text(errors="replace")[-3000:], file=sys.stderr)  # the server's own words, in the report
        raise
    return process


def stop_group(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group of a server we started (it and its workers), then SIGKILL what is left of it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    finally:
        kill_group(process)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 (on ``port``, else a free one) over ``backend_store``; ``args`` go to the
    command and ``env`` over this process's environment (less MLFLOW_TRACKING_*). :meth:`start` waits for /health,
    :meth:`stop` ends its process group; it can start again on the same port. A context manager: start, stop."""

    def __init__(
        self,
        folder: Path,
        backend_store: str,
        *args: str,
        artifacts: str | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        workers: int = 1,
    ) -> None:
        self.folder, self.backend_store, self.port = folder, backend_store, port or free_port()
        self.uri, self.process = f"http://127.0.0.1:{self.port}", None
        self.command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        self.command += ["--workers", str(workers), "--backend-store-uri", backend_store, *args]
        if artifacts is not None:
            self.command += ["--artifacts-destination", artifacts]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        self.env |= {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        log = self.folder / f"mlflow-{self.port}.log"
        self.process = start_server(self.command, log, f"{self.uri}/health", self.env, timeout_s)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
            self.process = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


RAY_CLI = Path(sys.executable).parent / "ray"


def start_ray_node(env: dict[str, str], log: Path, head: str | None = None, *flags: str) -> SimpleNamespace:
    """``ray start --block`` on 127.0.0.1 with free ports: a head when ``head`` is None, else a node joining the
    head at that address. Returns ``process``, ``ports`` (flag -> port) and ``temp_dir``; stop it with
    :func:`stop` and remove ``temp_dir``.
    """
    ports = {flag: free_port() for flag in ("--dashboard-agent-listen-port", "--metrics-export-port")}
    ports["--runtime-env-agent-port"] = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    if head is None:
        ports |= {flag: free_port() for flag in ("--port", "--dashboard-port", "--ray-client-server-port")}
        role = ["--head", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}"]
    else:
        role = [f"--address={head}"]
    process = subprocess.Popen(
        [RAY_CLI, "start", "--block", "--node-ip-address=127.0.0.1", *role, *flags]
        + [f"{flag}={port}" for flag, port in ports.items()],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return SimpleNamespace(process=process, ports=ports, temp_dir=temp_dir)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, function, args: tuple, results: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results[rank] = function(rank, world, *args)
    finally:
        dist.destroy_process_group()


def on_gloo_workers(function, *args, world: int = 2) -> list:
    """``function(rank, world, *args)`` in ``world`` processes joined by a gloo process group on 127.0.0.1 (as Ray
    Train's CPU workers are); their results in rank order. ``function`` must be defined at a module's top level."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gloo_worker, args=(world, free_port(), function, args, results), nprocs=world, join=True)
        return [results[rank] for rank in range(world)]


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store as MLflow creates it (its schema, the Default experiment), made once: creating one
    runs every schema migration, which takes seconds; ``project`` copies this file instead."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def use_project(home: Path, env: pytest.MonkeyPatch, empty_mlflow_store: Path) -> Path:
    """``home`` made, with a copy of ``empty_mlflow_store``, and set in ``env`` as PRETRAINLAB_HOME and its
    store as MLFLOW_TRACKING_URI."""
    home.mkdir()
    shutil.copyfile(empty_mlflow_store, home / "mlflow.db")
    env.setenv("PRETRAINLAB_HOME", str(home))
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home}/mlflow.db")
    return home


@pytest.fixture
def project(tmp_path, monkeypatch, empty_mlflow_store) -> Path:
    """A fresh PRETRAINLAB_HOME with its own (empty) MLflow sqlite store; data, runs and artifacts land here."""
    return use_project(tmp_path / "project", monkeypatch, empty_mlflow_store)


BUCKET = "pretrainlab-shared"
MOTO_SERVER = Path(sys.executable).parent / "moto_server"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 holding an empty bucket ``BUCKET``; the AWS variables point this process,
    and the Ray workers and MLflow servers started after it, at the server. Yields its endpoint."""
    import boto3

    endpoint = f"http://127.0.0.1:{free_port()}"
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    process = start_server([MOTO_SERVER, "-H", "127.0.0.1", "-p", endpoint.rpartition(":")[2]], log, endpoint)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_ENDPOINT_URL", endpoint)  # boto3, pyarrow (so Ray Train and Ray Data)
            env.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)  # an MLflow server's artifact store
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield endpoint
    finally:
        stop_group(process)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster with 2 CPUs for the tests of one module, shut down afterwards."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


def train_digits_checkpoint(cfg, data_folder: Path, out: Path, steps: int = 30, run_id: str | None = None) -> Path:
    """A small trained checkpoint without Ray: ``steps`` SGD steps of ``cfg``'s model on the prepared digits
    training split (evaluation preprocessing, seeded by ``runtime.seed``), saved with the training loop's
    ``checkpoint_meta``.
    """
    import torch

    from pretrainlab.checkpoint import checkpoint_meta, save_checkpoint
    from pretrainlab.data.catalog import dataset_info
    from pretrainlab.data.dataset import load_split_numpy
    from pretrainlab.data.transforms import eval_pipeline, normalize
    from pretrainlab.strategies import get_strategy

    info = dataset_info(str(data_folder))
    torch.manual_seed(cfg.runtime.seed)
    model = get_strategy(cfg.strategy).build_model(cfg, info["num_classes"], info["in_chans"])
    images, labels = load_split_numpy(data_folder, "train")
    inputs = normalize(eval_pipeline(cfg.data)(torch.from_numpy(images)), cfg.data)
    targets = torch.from_numpy(labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=0.9)
    model.train()
    metrics = {}
    for _ in range(steps):
        rows = torch.randint(len(targets), (64,))
        loss = model({"image": inputs[rows], "label": targets[rows]})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics = {"train/loss": loss.item()}
    return save_checkpoint(out, model.state_dict(), checkpoint_meta(cfg, info, 1, steps, metrics, run_id))


# --- Markers: ``needs_ray``, ``needs_server`` and ``slow`` (pyproject.toml) are set in the test files ---------------
# ``make test-fast`` leaves those tests out. When a run does, a test that starts Ray in this process or a server
# through start_server / start_ray_node anyway fails and names the marker it lacks.
_guard = {"active": False, "item": None}


def _heavy(what: str, marker: str, start):
    @functools.wraps(start)
    def guarded(*args, **kwargs):
        item = _guard["item"]
        if _guard["active"] and item is not None and item.get_closest_marker(marker) is None:
            pytest.fail(
                f"{item.nodeid} starts {what} but is not marked {marker}: "
                f"add @pytest.mark.{marker} to it (or pytestmark to its module)",
                pytrace=False,
            )
        return start(*args, **kwargs)

    return guarded


start_server = _heavy("a server (start_server)", "needs_server", start_server)
start_ray_node = _heavy("a Ray node (start_ray_node)", "needs_ray", start_ray_node)


def pytest_configure(config: pytest.Config) -> None:
    expression = config.getoption("markexpr", "") or ""
    if re.search(r"not\s+needs_(ray|server)", expression):
        _guard["active"] = True
        ray.init = _heavy("Ray (ray.init)", "needs_ray", ray.init)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _guard["item"] = item
    try:
        return (yield)
    finally:
        _guard["item"] = None

"""An on-disk queue of metrics that could not reach MLflow, and the command that replays it.

One JSON-lines file per run, ``$PRETRAINLAB_OUTBOX/<run_id>.jsonl`` (default
``$PRETRAINLAB_HOME/outbox/``); each line is one ``log`` call::

    {"step": 3, "timestamp": 1764270000000, "metrics": {"train/loss": 0.52}}

Lines are appended with flush + fsync, so a crash loses at most the line being written.
Nothing is held in memory: the file is the queue, read back one chunk (at most 1,000
metrics, MLflow's ``log_batch`` limit) at a time. The file is bounded to ``max_records``
lines; past that, new records are dropped and counted, and the log says so.

Replay is safe to repeat: records keep the timestamp of the original ``log`` call, and
MLflow stores a metric with the same key, value, step and timestamp only once.

    python -m pretrainlab.tracking.outbox replay [FILE_OR_FOLDER] [--tracking-uri URI]
    pretrainlab outbox replay [FILE_OR_FOLDER] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from mlflow.entities import Metric

from pretrainlab.paths import project_home

OUTBOX_ENV = "PRETRAINLAB_OUTBOX"
DEFAULT_MAX_RECORDS = 100_000
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


class OutboxError(RuntimeError):
    """An outbox file cannot be read; the message names the file and line."""


def outbox_folder() -> Path:
    """``$PRETRAINLAB_OUTBOX``, else ``outbox/`` in the project folder."""
    configured = os.environ.get(OUTBOX_ENV)
    return Path(configured).expanduser().resolve() if configured else project_home() / "outbox"


def outbox_path(run_id: str, folder: str | os.PathLike | None = None) -> Path:
    """The outbox file of run ``run_id``."""
    return Path(folder or outbox_folder()) / f"{run_id}.jsonl"


class Outbox:
    """The queued metrics of one run, in the order they were logged.

    Args:
        path: The JSON-lines file; created (with its folder) on the first append.
        max_records: Most lines the file may hold; records beyond it are dropped and counted.
    """

    def __init__(self, path: str | os.PathLike, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1, got {max_records}")
        self.path = Path(path)
        self.max_records = max_records
        self.dropped = 0
        self._count: int | None = None

    def __bool__(self) -> bool:
        return self.path.exists()

    def __len__(self) -> int:
        if self._count is None:
            self._count = _count_lines(self.path)
        return self._count

    def append(self, step: int, timestamp: int, metrics: Mapping[str, float]) -> bool:
        """Queue one ``log`` call; False when the outbox is full and the record was dropped."""
        line = json.dumps({"step": int(step), "timestamp": int(timestamp), "metrics": dict(metrics)}) + "\n"
        with self._locked():
            if not self.path.exists():  # sent meanwhile, by this process or a replay
                self._count = 0
            if len(self) >= self.max_records:
                self.dropped += 1
                return False
            with open(self.path, "ab") as out:
                _cut_torn_line(out)
                out.write(line.encode())
                out.flush()
                os.fsync(out.fileno())
            self._count = len(self) + 1
        return True

    def batches(self) -> Iterator[tuple[int, list[Metric]]]:
        """``(offset, metrics)`` chunks in logged order; ``offset`` is where the first line of the chunk starts.

        Raises:
            OutboxError: A line is not a queued metric record.
        """
        chunk: list[Metric] = []
        chunk_start = 0
        offset = 0
        with open(self.path, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                if not raw.endswith(b"\n"):  # torn by a crash while it was written: never acknowledged
                    break
                for metric in _parse(raw, self.path, number):
                    if not chunk:
                        chunk_start = offset
                    chunk.append(metric)
                    if len(chunk) == MAX_METRICS_PER_BATCH:
                        yield chunk_start, chunk
                        chunk = []
                offset += len(raw)
        if chunk:
            yield chunk_start, chunk

    def flush(self, send: Callable[[list[Metric]], None]) -> int:
        """Send every queued metric with ``send`` in order, then remove the file.

        When ``send`` raises, the records already sent are cut from the file (the file is
        rewritten and renamed over the old one) and the error propagates.

        Returns:
            The number of metrics sent.
        """
        sent = 0
        with self._locked():
            if not self.path.exists():
                return 0
            for chunk_start, chunk in self.batches():
                try:
                    send(chunk)
                except BaseException:
                    self._keep_from(chunk_start)
                    raise
                sent += len(chunk)
            self.path.unlink()
            self._count = 0
        return sent

    def _keep_from(self, offset: int) -> None:
        """Atomically cut the first ``offset`` bytes (records already sent) from the file."""
        if offset == 0:
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(self.path, "rb") as src, open(temporary, "wb") as dst:
            src.seek(offset)
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(temporary, self.path)
        self._count = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the outbox folder (other processes may append or replay)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _parse(raw: bytes, path: Path, number: int) -> list[Metric]:
    try:
        record = json.loads(raw)
        step, timestamp, metrics = record["step"], record["timestamp"], record["metrics"]
        if not (isinstance(step, int) and isinstance(timestamp, int) and isinstance(metrics, dict)):
            raise TypeError("step and timestamp must be integers, metrics an object")
        return [Metric(str(key), _number(value), timestamp, step) for key, value in metrics.items()]
    except (ValueError, KeyError, TypeError) as err:
        raise OutboxError(
            f"{path}, line {number}: not a queued metric record ({type(err).__name__}: {err}); "
            "fix or delete that line, then replay again"
        ) from None


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"metric value {value!r} is not a number")
    return float(value)


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as lines:
        return sum(1 for raw in lines if raw.endswith(b"\n"))


def _cut_torn_line(out) -> None:
    """Truncate an unterminated last line (a crash mid-write) so the next record starts on its own line."""
    size = out.seek(0, os.SEEK_END)
    if size == 0:
        return
    with open(out.name, "rb") as src:
        src.seek(size - 1)
        if src.read(1) == b"\n":
            return
        src.seek(0)
        end = src.read().rfind(b"\n") + 1
    out.truncate(end)
    print(f"outbox {out.name}: dropped an unfinished record at its end (a crash while it was written)", flush=True)


def replay(target: str | os.PathLike, tracking_uri: str | None = None) -> int:
    """Send the outbox file ``target`` (or every ``*.jsonl`` in folder ``target``) to MLflow.

    Returns:
        The number of metrics sent.
    """
    from pretrainlab.paths import resolve_tracking_uri
    from pretrainlab.tracking.mlflow import MetricLogger, client_for

    target = Path(target)
    files = sorted(target.glob("*.jsonl")) if target.is_dir() else [target]
    if not target.exists():
        raise FileNotFoundError(f"no outbox file or folder at {target}")
    uri = resolve_tracking_uri(tracking_uri)
    client = client_for(uri)
    total = 0
    for path in files:
        logger = MetricLogger(client, path.stem, outbox_dir=path.parent, timeout_s=30, max_retries=3)
        sent = logger.flush()
        print(f"replayed {sent} metrics from {path} into run {path.stem} at {uri}")
        total += sent
    if not files:
        print(f"nothing to replay: no *.jsonl files in {target}")
    return total


def main(argv: list[str] | None = None) -> int:
    via_cli = sys.argv[0].startswith("pretrainlab ")  # `pretrainlab outbox ...` sets argv[0] to that
    parser = argparse.ArgumentParser(
        prog=None if via_cli else "python -m pretrainlab.tracking.outbox",
        description="Replay metrics queued while MLflow was unreachable into MLflow.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    replay_parser = commands.add_parser("replay", help="send outbox files to MLflow and remove them")
    replay_parser.add_argument(
        "target", nargs="?", help=f"an outbox file or folder (default: ${OUTBOX_ENV} or $PRETRAINLAB_HOME/outbox)"
    )
    replay_parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    try:
        replay(args.target or outbox_folder(), args.tracking_uri)
    except Exception as err:  # noqa: BLE001 - a command line reports any failure in one line
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

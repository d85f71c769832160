"""k-nearest-neighbour evaluation of a checkpoint's backbone features; log the accuracies to MLflow.

    python jobs/knn_eval.py runs/<run-name>/checkpoint_.../checkpoint --k 20 200 --temperature 0.07
    python jobs/knn_eval.py models:/fmnist-simclr@champion --split val --no-mlflow

The training split's features are the bank, the features of ``--split`` the queries (with
``--split train``, leave-one-out: no image votes for itself). Each query takes its ``k`` most
cosine-similar bank entries, which vote ``exp(similarity / temperature)`` for their class. Works
for a checkpoint of any strategy: only its ``backbone`` is used.

The evaluation is logged as a run of its own, nested under the training run that made the
checkpoint (when that run is known): metrics ``knn/top1_k<k>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param

from pretrainlab.checkpoint import CheckpointError
from pretrainlab.data.errors import DatasetError
from pretrainlab.evaluation.embedding import checkpoint_features, knn_accuracies
from pretrainlab.paths import resolve_tracking_uri
from pretrainlab.tracking.mlflow import MetricLogger, TrackingError, check_tracking, client_for, ensure_experiment

BANK_SPLIT = "train"


class ArgumentError(ValueError):
    """An argument value out of range; the message names it."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint folder, models:/NAME@alias, models:/NAME/VERSION or runs:/ID/path")
    parser.add_argument("--k", type=int, nargs="+", default=[20, 200], help="neighbour counts (default: 20 200)")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight temperature (default: 0.07)")
    parser.add_argument("--split", default="test", help="query split; the train split is the bank (default: test)")
    parser.add_argument("--data", help="prepared dataset folder (default: the one in the checkpoint's config)")
    parser.add_argument("--batch-size", type=int, default=512, help="images per forward pass")
    parser.add_argument("--no-mlflow", action="store_true", help="print the metrics only")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if any(k < 1 for k in args.k):
        raise ArgumentError(f"--k: every k must be at least 1, got {args.k}")
    if args.temperature <= 0:
        raise ArgumentError(f"--temperature must be positive, got {args.temperature}")
    if args.batch_size < 1:
        raise ArgumentError(f"--batch-size must be at least 1, got {args.batch_size}")


def start_child_run(
    client: MlflowClient, meta: dict[str, Any], source: str, split: str, protocol: str, params: dict[str, Any]
) -> str:
    """A run for one evaluation protocol of a checkpoint, nested under the checkpoint's training run when known,
    in the experiment of the checkpoint's config, with ``params`` logged; returns its id."""
    experiment_id = ensure_experiment(client, meta["config"]["runtime"]["experiment"])
    tags = {"pretrainlab.evaluated": source, "pretrainlab.split": split, "pretrainlab.protocol": protocol}
    if meta.get("mlflow_run_id"):
        tags["mlflow.parentRunId"] = meta["mlflow_run_id"]
    run_name = f"{protocol}-{split}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(key, str(value)) for key, value in params.items()])
    return run_id


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tracking_uri = resolve_tracking_uri()
    try:
        check_args(args)
        if not args.no_mlflow or args.source.startswith(("models:/", "runs:/")):
            check_tracking(tracking_uri)
        found = checkpoint_features(args.source, [BANK_SPLIT, args.split], args.data, args.batch_size)
    except (ArgumentError, TrackingError, CheckpointError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bank, bank_labels = found.splits[BANK_SPLIT]
    queries, query_labels = found.splits[args.split]
    accuracies = knn_accuracies(
        bank, bank_labels, queries, query_labels, found.num_classes, args.k, args.temperature, args.split == BANK_SPLIT
    )
    metrics = {f"knn/top1_k{k}": top1 for k, top1 in accuracies.items()}
    print(
        f"{args.source} kNN on {args.split} (bank: {BANK_SPLIT}, temperature {args.temperature:g}): "
        + "  ".join(f"top-1 k={k} {top1:.2f}%" for k, top1 in accuracies.items())
    )
    if args.no_mlflow:
        return 0

    client = client_for(tracking_uri)
    params = {"k": " ".join(map(str, args.k)), "temperature": args.temperature, "bank": BANK_SPLIT}
    run_id = start_child_run(client, found.loaded.meta, args.source, args.split, "knn", params)
    MetricLogger(client, run_id).log(metrics, 0)
    client.set_terminated(run_id, "FINISHED")
    print(f"logged to MLflow run {run_id} (store {tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""k-nearest-neighbour evaluation of a checkpoint's backbone features; log the accuracies to MLflow.

    python jobs/knn_eval.py runs/<run-name>/checkpoint_.../checkpoint --k 20 200 --temperature 0.07
    python jobs/knn_eval.py models:/fmnist-simclr@champion --split val --no-mlflow

On a cluster: ``ray job submit --working-dir . -- python jobs/knn_eval.py SOURCE`` (the
evaluation itself runs in the job's driver process).

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

from pretrainlab.evaluation.embedding import (
    KNN_BANK_SPLIT,
    KNN_KS,
    KNN_TEMPERATURE,
    checkpoint_features,
    knn_accuracies,
)
from pretrainlab.evaluation.runs import (
    JOB_ERRORS,
    ArgumentError,
    check_counts,
    checked_tracking_uri,
    job_parser,
    log_child_run,
    report_error,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__, batch_size=512)
    ks = " ".join(map(str, KNN_KS))
    parser.add_argument("--k", type=int, nargs="+", default=list(KNN_KS), help=f"neighbour counts (default: {ks})")
    parser.add_argument(
        "--temperature",
        type=float,
        default=KNN_TEMPERATURE,
        help=f"vote weight temperature (default: {KNN_TEMPERATURE})",
    )
    parser.add_argument("--split", default="test", help="query split; the train split is the bank (default: test)")
    parser.add_argument("--data", help="prepared dataset folder (default: the one in the checkpoint's config)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if any(k < 1 for k in args.k):
        raise ArgumentError(f"--k: every k must be at least 1, got {args.k}")
    if args.temperature <= 0:
        raise ArgumentError(f"--temperature must be positive, got {args.temperature}")
    check_counts(args, "batch_size")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        tracking_uri = checked_tracking_uri(args.source, args.no_mlflow)
        found = checkpoint_features(args.source, [KNN_BANK_SPLIT, args.split], args.data, args.batch_size)
    except JOB_ERRORS as err:
        return report_error(err)
    bank, bank_labels = found.splits[KNN_BANK_SPLIT]
    queries, query_labels = found.splits[args.split]
    accuracies = knn_accuracies(
        bank,
        bank_labels,
        queries,
        query_labels,
        found.num_classes,
        args.k,
        args.temperature,
        args.split == KNN_BANK_SPLIT,
    )
    print(
        f"{args.source} kNN on {args.split} (bank: {KNN_BANK_SPLIT}, temperature {args.temperature:g}): "
        + "  ".join(f"top-1 k={k} {top1:.2f}%" for k, top1 in accuracies.items())
    )
    if args.no_mlflow:
        return 0

    params = {"k": " ".join(map(str, args.k)), "temperature": args.temperature, "bank": KNN_BANK_SPLIT}
    metrics = {f"knn/top1_k{k}": top1 for k, top1 in accuracies.items()}
    run_id = log_child_run(tracking_uri, found.loaded.meta, args.source, args.split, "knn", params, metrics)
    print(f"logged to MLflow run {run_id} (store {tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

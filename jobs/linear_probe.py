"""Linear probe of a checkpoint's frozen backbone: a linear classifier on cached features; log it to MLflow.

    python jobs/linear_probe.py runs/<run-name>/checkpoint_.../checkpoint --epochs 100
    python jobs/linear_probe.py models:/fmnist-simclr@champion --lr 0.05 --no-mlflow

On a cluster: ``ray job submit --working-dir . -- python jobs/linear_probe.py SOURCE`` (the
evaluation itself runs in the job's driver process).

The backbone's features of the train, validation and ``--split`` splits are extracted once
(evaluation preprocessing); the classifier trains on the train features (standardised with
their mean and std) with SGD and a cosine schedule, the epoch with the best top-1 on
``--val-split`` is kept, and its top-1 / top-5 on ``--split`` reported. Works for a
checkpoint of any strategy: only its ``backbone`` is used. ``--features last-blocks`` takes a
ViT's features as DINO's linear evaluation does: the class token after each of the last
``--blocks`` blocks and the mean patch token, concatenated (default: the backbone's pooled output).

The evaluation is logged as a run of its own, nested under the training run that made the
checkpoint (when that run is known): metrics ``linear_probe/top1``, ``linear_probe/top5``, ``linear_probe/loss``,
and per epoch ``linear_probe/train_loss`` and ``linear_probe/val_top1``.
"""

from __future__ import annotations

import argparse
import sys

from pretrainlab.evaluation.embedding import (
    FEATURE_KINDS,
    FeatureError,
    checkpoint_features,
    evaluate_probe,
    train_linear_probe,
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

TRAIN_SPLIT = "train"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__, batch_size=512)
    parser.add_argument("--epochs", type=int, default=100, help="epochs over the cached features (default: 100)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD peak learning rate (default: 0.1)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay (default: 0)")
    parser.add_argument("--probe-batch-size", type=int, default=256, help="features per probe step (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="shuffling of the probe's batches")
    parser.add_argument("--split", default="test", help="split to report (default: test)")
    parser.add_argument("--val-split", default="val", help="split that picks the best epoch (default: val)")
    parser.add_argument("--data", help="prepared dataset folder (default: the one in the checkpoint's config)")
    parser.add_argument(
        "--features", choices=FEATURE_KINDS, default="pooled", help="backbone features to probe (default: pooled)"
    )
    parser.add_argument("--blocks", type=int, default=4, help="ViT blocks for --features last-blocks (default: 4)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    check_counts(args, "epochs", "probe_batch_size", "batch_size")
    if args.lr <= 0 or args.weight_decay < 0:
        raise ArgumentError(f"--lr must be positive and --weight-decay at least 0, got {args.lr}, {args.weight_decay}")
    if args.split in (TRAIN_SPLIT, args.val_split):
        raise ArgumentError(
            f"--split {args.split}: the probe trains on {TRAIN_SPLIT!r} and picks its epoch on {args.val_split!r} "
            "(--val-split); report on another split"
        )
    if args.val_split == TRAIN_SPLIT:
        raise ArgumentError(f"--val-split must not be the training split {TRAIN_SPLIT!r}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        tracking_uri = checked_tracking_uri(args.source, args.no_mlflow)
        splits = [TRAIN_SPLIT, args.val_split, args.split]
        found = checkpoint_features(args.source, splits, args.data, args.batch_size, args.features, args.blocks)
    except (*JOB_ERRORS, FeatureError) as err:
        return report_error(err)
    linear, history = train_linear_probe(
        *found.splits[TRAIN_SPLIT],
        *found.splits[args.val_split],
        found.num_classes,
        args.epochs,
        args.lr,
        args.weight_decay,
        args.probe_batch_size,
        args.seed,
    )
    metrics = evaluate_probe(linear, *found.splits[args.split])
    print(
        f"{args.source} linear probe on {args.split}: top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
        f"(epoch {history.best_epoch}/{args.epochs}, {args.val_split} top-1 {history.best_val_top1:.2f}%)"
    )
    if args.no_mlflow:
        return 0

    params = {
        "epochs": args.epochs,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "probe_batch_size": args.probe_batch_size,
        "seed": args.seed,
        "val_split": args.val_split,
        "features": args.features,
    }
    if args.features == "last-blocks":
        params["blocks"] = args.blocks
    final = {f"linear_probe/{k}": v for k, v in metrics.items()} | {"linear_probe/best_epoch": history.best_epoch}
    curves = {"linear_probe/train_loss": history.train_loss, "linear_probe/val_top1": history.val_top1}
    meta = found.loaded.meta
    run_id = log_child_run(tracking_uri, meta, args.source, args.split, "linear_probe", params, final, curves)
    print(f"logged to MLflow run {run_id} (store {tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

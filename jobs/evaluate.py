"""Evaluate a checkpoint on a split of its dataset; log metrics (and pictures) to MLflow.

Every kind of checkpoint, by its strategy's task (``pretrainlab.evaluation.tasks.EVALUATORS``):
classification: loss, top-1, top-5 and a confusion matrix. Self-supervised (embedding): kNN top-1 of the
backbone's features (k=20 and 200, the train split as the bank) and a t-SNE picture. Image-text: retrieval
Recall@1/5/10 both ways and the shuffled-image baseline (``shuffled/*``); on the scenes set also text->image
Recall@K per kind of caption (``t2i_r1/spatial_relation``, ...). Generative (BLIP-style): captioning
BLEU/CIDEr (``shuffled/*``; on retrieval rows also Recall@K, contrastive and re-ranked by the matching
head, ``itm/*``), VQA accuracy (``question_only/*``) or grounding accuracy and mean IoU (``centre_box/*``),
by the dataset they were trained on, and a grid of test images with predictions and references.
Pictures are logged under ``evaluation/<split>/``.

    python jobs/evaluate.py models:/fmnist-classifier/1 --split test
    python jobs/evaluate.py runs/<run-name>/checkpoint_.../checkpoint --split val

On a cluster: ``ray job submit --working-dir . -- python jobs/evaluate.py SOURCE`` (the
evaluation itself runs in the job's driver process).

The evaluation is logged as a run of its own, nested under the training run that made the
checkpoint (when that run is known).
"""

from __future__ import annotations

import argparse
import sys
import time

from pretrainlab.checkpoint import CheckpointError
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.errors import DatasetError
from pretrainlab.evaluation.tasks import EVALUATORS, log_report
from pretrainlab.inference.loading import load_model
from pretrainlab.paths import resolve_tracking_uri
from pretrainlab.strategies import task_of
from pretrainlab.tracking.mlflow import TrackingError, check_tracking, client_for, ensure_experiment
from pretrainlab.tracking.registry import EVALUATION_TAG


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint folder, models:/NAME@alias, models:/NAME/VERSION or runs:/ID/path")
    parser.add_argument("--split", default="test", help="dataset split to evaluate (default: test)")
    parser.add_argument("--data", help="prepared dataset folder (default: the one in the checkpoint's config)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--no-mlflow", action="store_true", help="print the metrics only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tracking_uri = resolve_tracking_uri()
    try:
        if not args.no_mlflow or args.source.startswith(("models:/", "runs:/")):
            check_tracking(tracking_uri)
        loaded = load_model(args.source)
        evaluator = EVALUATORS[task_of(loaded.config.strategy)]
        data_folder = args.data or dataset_dir(loaded.config)
        report = evaluator.evaluate_split(loaded, args.split, data_folder, args.batch_size)
    except (TrackingError, CheckpointError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.source} on {args.split}: " + "  ".join(f"{k} {v:.4f}" for k, v in report.metrics.items()))
    if args.no_mlflow:
        return 0

    client = client_for(tracking_uri)
    experiment_id = ensure_experiment(client, loaded.config.runtime.experiment)
    tags = {EVALUATION_TAG: args.source, "pretrainlab.split": args.split}
    if loaded.meta.get("mlflow_run_id"):
        tags["mlflow.parentRunId"] = loaded.meta["mlflow_run_id"]
    run_name = f"evaluate-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    try:
        log_report(client, run_id, report)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    print(f"logged to MLflow run {run_id} (store {tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a checkpoint on a split of its dataset; log metrics (and a confusion matrix) to MLflow.

Classification checkpoints: loss, top-1, top-5 and a confusion matrix. Image-text checkpoints:
retrieval Recall@1/5/10 both ways and the shuffled-image baseline (``shuffled/*``); on the scenes
set also text->image Recall@K per kind of caption (``t2i_r1/spatial_relation``, ...). Generative
(BLIP-style) checkpoints: captioning BLEU/CIDEr (``shuffled/*``; on retrieval rows also Recall@K,
contrastive and re-ranked by the matching head, ``itm/*``), VQA accuracy (``question_only/*``)
or grounding accuracy and mean IoU (``centre_box/*``), by the dataset they were trained on, and a
grid of test images with predictions and references (``evaluation/<split>/samples.png``).

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
from pretrainlab.data.errors import DatasetError
from pretrainlab.evaluation.classification import evaluate_checkpoint, log_evaluation
from pretrainlab.evaluation.generation import evaluate_generation_split, generation_samples_figure
from pretrainlab.evaluation.image_text import evaluate_retrieval_split
from pretrainlab.inference.loading import load_model
from pretrainlab.paths import resolve_tracking_uri
from pretrainlab.strategies import get_strategy
from pretrainlab.tracking.mlflow import MetricLogger, TrackingError, check_tracking, client_for, ensure_experiment


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
        task = get_strategy(loaded.config.strategy).TASK
        if task == "image_text":
            evaluation, metrics = None, evaluate_retrieval_split(loaded, args.split, args.data, args.batch_size)
        elif task == "generation":
            evaluation, metrics = None, evaluate_generation_split(loaded, args.split, args.data, args.batch_size)
        else:
            evaluation = evaluate_checkpoint(loaded, args.split, args.data, args.batch_size)
            metrics = evaluation.metrics
    except (TrackingError, CheckpointError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = loaded.meta
    print(f"{args.source} on {args.split}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if args.no_mlflow:
        return 0

    client = client_for(tracking_uri)
    experiment_id = ensure_experiment(client, meta["config"]["runtime"]["experiment"])
    tags = {"pretrainlab.evaluated": args.source, "pretrainlab.split": args.split}
    if meta.get("mlflow_run_id"):
        tags["mlflow.parentRunId"] = meta["mlflow_run_id"]
    run = client.create_run(
        experiment_id, run_name=f"evaluate-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags
    )
    if evaluation is not None:
        log_evaluation(client, run.info.run_id, evaluation)
    else:
        MetricLogger(client, run.info.run_id).log({f"{args.split}/{k}": v for k, v in metrics.items()}, 0)
    if task == "generation":
        figure = generation_samples_figure(loaded, args.split, args.data)
        client.log_figure(run.info.run_id, figure, f"evaluation/{args.split}/samples.png")
    client.set_terminated(run.info.run_id, "FINISHED")
    print(f"logged to MLflow run {run.info.run_id} (store {tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

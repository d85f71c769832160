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

from pretrainlab.data.catalog import dataset_dir
from pretrainlab.evaluation.runs import JOB_ERRORS, checked_tracking_uri, job_parser, report_error, start_child_run
from pretrainlab.evaluation.tasks import EVALUATORS, log_report
from pretrainlab.inference.loading import load_model
from pretrainlab.strategies import task_of
from pretrainlab.tracking.mlflow import client_for, closing_run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__, batch_size=512)
    parser.add_argument("--split", default="test", help="dataset split to evaluate (default: test)")
    parser.add_argument("--data", help="prepared dataset folder (default: the one in the checkpoint's config)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tracking_uri = checked_tracking_uri(args.source, args.no_mlflow)
        loaded = load_model(args.source)
        evaluator = EVALUATORS[task_of(loaded.config.strategy)]
        data_folder = args.data or dataset_dir(loaded.config)
        report = evaluator.evaluate_split(loaded, args.split, data_folder, args.batch_size)
    except JOB_ERRORS as err:
        return report_error(err)
    print(f"{args.source} on {args.split}: " + "  ".join(f"{k} {v:.4f}" for k, v in report.metrics.items()))
    if args.no_mlflow:
        return 0

    client = client_for(tracking_uri)
    run_id = start_child_run(client, loaded.meta, args.source, args.split, "evaluate", {})
    with closing_run(client, run_id):
        log_report(client, run_id, report)
    print(f"logged to MLflow run {run_id} (store {tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

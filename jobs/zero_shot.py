"""Zero-shot classification by an image-text checkpoint: class names in prompts, no training; log top-1 to MLflow.

    python jobs/zero_shot.py runs:/<run id>/checkpoint --data scenes/grounding --template "a {}"
    python jobs/zero_shot.py models:/scenes-clip@champion --data fmnist --classes Trouser,Sneaker,Bag,Shirt

On a cluster: ``ray job submit --working-dir . -- python jobs/zero_shot.py SOURCE --data DATA`` (the
evaluation itself runs in the job's driver process).

``--data`` is a built-in dataset name (``fmnist``, ``digits``, ``scenes/grounding``) or a prepared
folder. A classification dataset is classified image by image among its class names; a grounding
dataset object by object (each referred object cut out by its box) among its categories (the
shapes of the scenes set). Images are converted to the model's channels and training image size.

The evaluation is logged as a run of its own, nested under the training run that made the
checkpoint (when that run is known): metrics ``zero_shot/top1`` and ``zero_shot/chance``.
"""

from __future__ import annotations

import argparse
import sys

from pretrainlab.config import ConfigError
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.evaluation.runs import (
    JOB_ERRORS,
    check_counts,
    checked_tracking_uri,
    job_parser,
    log_child_run,
    report_error,
)
from pretrainlab.evaluation.zero_shot import labelled_images, zero_shot_top1
from pretrainlab.inference.inferencers import ImageTextInferencer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = job_parser(__doc__, batch_size=64)
    parser.add_argument("--data", required=True, help="built-in dataset name or prepared folder to classify")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--template", default="a {}", help="prompt; {} is the lower-cased class name (default: 'a {}')")
    parser.add_argument("--classes", help="comma-separated class names to keep (default: all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_counts(args, "batch_size")
        tracking_uri = checked_tracking_uri(args.source, args.no_mlflow)
        inferencer = ImageTextInferencer(args.source, pretrained=True)
        data_cfg = inferencer.info.config.model_copy(
            update={"data": inferencer.info.config.data.model_copy(update={"dataset": args.data})}
        )
        classes = args.classes.split(",") if args.classes else None
        data = labelled_images(dataset_dir(data_cfg), args.split, classes)
        metrics = zero_shot_top1(inferencer, data, args.template, args.batch_size)
    except (*JOB_ERRORS, ConfigError, ValueError) as err:
        return report_error(err)
    print(
        f"{args.source} zero-shot on {args.data} {args.split} ({len(data.labels)} images, {len(data.class_names)} "
        f"prompts like {args.template.format(data.class_names[0].lower())!r}): top-1 {metrics['top1']:.2f}% "
        f"(chance {metrics['chance']:.2f}%)"
    )
    if args.no_mlflow:
        return 0

    params = {"data": args.data, "template": args.template, "classes": ",".join(data.class_names)}
    metrics = {f"zero_shot/{key}": value for key, value in metrics.items()}
    run_id = log_child_run(tracking_uri, inferencer.info.meta, args.source, args.split, "zero_shot", params, metrics)
    print(f"logged to MLflow run {run_id} (store {tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

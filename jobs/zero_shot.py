"""Zero-shot classification by an image-text checkpoint: class names in prompts, no training; log top-1 to MLflow.

    python jobs/zero_shot.py runs:/<run id>/checkpoint --data scenes/grounding --template "a {}"
    python jobs/zero_shot.py models:/scenes-clip@champion --data fmnist --classes Trouser,Sneaker,Bag,Shirt

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

from knn_eval import start_child_run

from pretrainlab.checkpoint import CheckpointError
from pretrainlab.config import ConfigError
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.errors import DatasetError
from pretrainlab.evaluation.zero_shot import labelled_images, zero_shot_top1
from pretrainlab.inference.inferencers import ImageTextInferencer
from pretrainlab.paths import resolve_tracking_uri
from pretrainlab.tracking.mlflow import MetricLogger, TrackingError, check_tracking, client_for


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint folder, models:/NAME@alias, models:/NAME/VERSION or runs:/ID/path")
    parser.add_argument("--data", required=True, help="built-in dataset name or prepared folder to classify")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--template", default="a {}", help="prompt; {} is the lower-cased class name (default: 'a {}')")
    parser.add_argument("--classes", help="comma-separated class names to keep (default: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--no-mlflow", action="store_true", help="print the metrics only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tracking_uri = resolve_tracking_uri()
    try:
        if not args.no_mlflow or args.source.startswith(("models:/", "runs:/")):
            check_tracking(tracking_uri)
        inferencer = ImageTextInferencer(args.source, pretrained=True)
        data_cfg = inferencer.info.config.model_copy(
            update={"data": inferencer.info.config.data.model_copy(update={"dataset": args.data})}
        )
        classes = args.classes.split(",") if args.classes else None
        data = labelled_images(dataset_dir(data_cfg), args.split, classes)
        metrics = zero_shot_top1(inferencer, data, args.template, args.batch_size)
    except (TrackingError, CheckpointError, DatasetError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{args.source} zero-shot on {args.data} {args.split} ({len(data.labels)} images, {len(data.class_names)} "
        f"prompts like {args.template.format(data.class_names[0].lower())!r}): top-1 {metrics['top1']:.2f}% "
        f"(chance {metrics['chance']:.2f}%)"
    )
    if args.no_mlflow:
        return 0
    client = client_for(tracking_uri)
    params = {"data": args.data, "template": args.template, "classes": ",".join(data.class_names)}
    run_id = start_child_run(client, inferencer.info.meta, args.source, args.split, "zero_shot", params)
    MetricLogger(client, run_id).log({f"zero_shot/{key}": value for key, value in metrics.items()}, 0)
    client.set_terminated(run_id, "FINISHED")
    print(f"logged to MLflow run {run_id} (store {tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

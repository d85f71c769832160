"""Confusion matrix of a classifier's predictions, as a PNG and a CSV table.

    python -m pretrainlab.analysis.confusion_matrix runs/<run>/checkpoint_.../checkpoint [--split test]
    python -m pretrainlab.analysis.confusion_matrix models:/fmnist-classifier@champion --normalize --out cm.png

Evaluates the checkpoint on a split of its dataset (the evaluation pipeline, as
``jobs/evaluate.py``), prints top-1 / top-5 / loss, and writes the matrix as a PNG and,
next to it, a CSV (counts; with ``--normalize`` each row divided by its true-class total).
With ``--mlflow-run ID`` both are logged under ``confusion_matrix/``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException

from pretrainlab.analysis.outputs import ERRORS, add_output_arguments, check_mlflow_run, publish, report_error
from pretrainlab.data.catalog import dataset_dir
from pretrainlab.data.dataset import load_split_numpy
from pretrainlab.evaluation.classification import predict
from pretrainlab.evaluation.figures import save_confusion_matrix
from pretrainlab.inference.loading import load_model
from pretrainlab.metrics.classification import evaluate_logits
from pretrainlab.metrics.confusion import confusion_counts, normalize_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint folder, models:/NAME@alias, models:/NAME/VERSION or runs:/ID/path")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--normalize", action="store_true", help="divide each row by its true-class count")
    parser.add_argument("--batch-size", type=int, default=512)
    add_output_arguments(parser, "confusion_matrix.png")
    args = parser.parse_args(argv)
    try:
        check_mlflow_run(args)
        loaded = load_model(args.source, tracking_uri=args.tracking_uri)
        images, labels = load_split_numpy(dataset_dir(loaded.config), args.split)
        logits = predict(loaded.model, images, loaded.config.data, args.batch_size)
        metrics = evaluate_logits(logits, labels)
        print(f"{args.source} on {args.split}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        names = loaded.class_names
        matrix = confusion_counts(labels, logits.argmax(1).numpy(), len(names))
        title = f"{loaded.config.data.dataset} {args.split}, top-1 {metrics['top1']:.2f}%"
        if args.normalize:
            matrix = normalize_rows(matrix)
            title += ", rows normalised"
        out = Path(args.out)
        out = out.with_suffix(".png") if out.suffix.lower() == ".csv" else out
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            png, table = save_confusion_matrix(matrix, names, tmp, title=title)
            shutil.move(png, out)
            shutil.move(table, out.with_suffix(".csv"))
        for path in (out, out.with_suffix(".csv")):
            publish(path, args, "confusion_matrix")
    except (*ERRORS, MlflowException) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())

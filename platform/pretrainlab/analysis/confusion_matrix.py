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
import csv
import os
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix  # noqa: E402


def compute(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` over ``num_classes`` classes."""
    return confusion_matrix(labels, preds, labels=np.arange(num_classes))


def save(matrix: np.ndarray, class_names: list[str], folder: str | os.PathLike, title: str = "") -> list[Path]:
    """Write ``confusion_matrix.png`` (counts in cells, coloured by count) and ``confusion_matrix.csv``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png, table = folder / "confusion_matrix.png", folder / "confusion_matrix.csv"
    size = max(6.0, 0.6 * len(class_names))
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(ax=ax, xticks_rotation=45, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\pred", *class_names])
        writer.writerows([name, *row] for name, row in zip(class_names, matrix.tolist(), strict=True))
    return [png, table]


def main(argv: list[str] | None = None) -> int:
    # imported here: tracking.mlflow imports this module for compute / save
    from mlflow.exceptions import MlflowException

    from pretrainlab.analysis.outputs import ERRORS, add_output_arguments, check_mlflow_run, publish, report_error
    from pretrainlab.data.catalog import dataset_dir
    from pretrainlab.data.dataset import load_split_numpy
    from pretrainlab.inference.loading import load_model
    from pretrainlab.train.evaluate import evaluate_logits, predict

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
        matrix = compute(labels, logits.argmax(1).numpy(), len(names))
        title = f"{loaded.config.data.dataset} {args.split}, top-1 {metrics['top1']:.2f}%"
        if args.normalize:
            matrix = np.round(matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1), 3)
            title += ", rows normalised"
        out = Path(args.out)
        out = out.with_suffix(".png") if out.suffix.lower() == ".csv" else out
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            png, table = save(matrix, names, tmp, title=title)
            shutil.move(png, out)
            shutil.move(table, out.with_suffix(".csv"))
        for path in (out, out.with_suffix(".csv")):
            publish(path, args, "confusion_matrix")
    except (*ERRORS, MlflowException) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())

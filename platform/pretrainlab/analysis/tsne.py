"""t-SNE of a model's backbone features on a dataset split, as a scatter plot coloured by class.

    python -m pretrainlab.analysis.tsne runs/<run>/checkpoint_.../checkpoint [--split test] [--num 1000]
    python -m pretrainlab.analysis.tsne models:/fmnist-classifier@champion --perplexity 50 --out tsne.png

Takes a class-stratified sample of ``--num`` images of the split (every class in proportion,
chosen with ``--seed``), runs them through the evaluation pipeline and the backbone (the
pooled features the classification head sees), and embeds the features in 2-D with
scikit-learn's t-SNE. Writes the PNG and, next to it, a CSV of the 2-D points with their
row index, label and class name; with ``--mlflow-run ID`` both are logged under ``tsne/``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException

from pretrainlab.analysis.outputs import (
    ERRORS,
    AnalysisError,
    add_output_arguments,
    check_mlflow_run,
    publish,
    report_error,
)
from pretrainlab.analysis.samples import features, load_subset
from pretrainlab.evaluation.figures import tsne_embed, tsne_plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="checkpoint folder, models:/NAME@alias, models:/NAME/VERSION or runs:/ID/path")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument("--num", type=int, default=1000, help="how many images, stratified by class (default: 1000)")
    parser.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default: 30)")
    parser.add_argument("--seed", type=int, default=0, help="which images, and t-SNE's random state")
    add_output_arguments(parser, "tsne.png")
    args = parser.parse_args(argv)
    try:
        if args.num < 2:
            raise AnalysisError(f"--num must be at least 2, not {args.num}")
        check_mlflow_run(args)
        loaded, images, labels, rows = load_subset(args.source, args.split, args.num, args.seed, args.tracking_uri)
        try:
            points = tsne_embed(features(loaded, images), args.perplexity, args.seed)
        except ValueError as err:
            raise AnalysisError(str(err)) from None
        title = (
            f"t-SNE of {loaded.config.model.backbone} features, {loaded.config.data.dataset} {args.split} "
            f"({len(labels)} images, perplexity {args.perplexity:g})"
        )
        fig = tsne_plot(points, labels, loaded.class_names, title)
        out = Path(args.out)
        out = out.with_suffix(".png") if out.suffix.lower() == ".csv" else out
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, bbox_inches="tight")
        table = out.with_suffix(".csv")
        with table.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["row", "label", "class", "x", "y"])
            for row, label, (x, y) in zip(rows.tolist(), labels.tolist(), points.tolist(), strict=True):
                writer.writerow([row, label, loaded.class_names[label], f"{x:.5f}", f"{y:.5f}"])
        publish(out, args, "tsne")
        publish(table, args, "tsne")
    except (*ERRORS, MlflowException) as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())

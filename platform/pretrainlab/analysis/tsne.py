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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from pretrainlab.analysis.outputs import (  # noqa: E402
    ERRORS,
    AnalysisError,
    add_output_arguments,
    check_mlflow_run,
    publish,
    report_error,
)
from pretrainlab.analysis.samples import features, load_subset  # noqa: E402


def embed(feats: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """2-D t-SNE of ``feats`` (PCA initialisation, automatic learning rate)."""
    if len(feats) < 2:
        raise AnalysisError(f"t-SNE needs at least 2 samples, got {len(feats)}")
    if not 0 < perplexity < len(feats):
        raise AnalysisError(
            f"--perplexity must be between 0 and the number of samples ({len(feats)}), not {perplexity}"
        )
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(feats.astype(np.float64))


def plot(points: np.ndarray, labels: np.ndarray, class_names: list[str], title: str) -> plt.Figure:
    """Scatter of the points, one colour per class, with a legend of class names."""
    fig, ax = plt.subplots(figsize=(8, 7))
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for label in np.unique(labels):
        mine = labels == label
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        ax.scatter(points[mine, 0], points[mine, 1], s=10, color=cmap(label % cmap.N), label=name, alpha=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=1.5, frameon=False)
    fig.tight_layout()
    return fig


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
        points = embed(features(loaded, images), args.perplexity, args.seed)
        title = (
            f"t-SNE of {loaded.config.model.backbone} features, {loaded.config.data.dataset} {args.split} "
            f"({len(labels)} images, perplexity {args.perplexity:g})"
        )
        fig = plot(points, labels, loaded.class_names, title)
        out = Path(args.out)
        out = out.with_suffix(".png") if out.suffix.lower() == ".csv" else out
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
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

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
import torch  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402
from torch import nn  # noqa: E402

from pretrainlab.analysis.outputs import add_output_arguments, publish  # noqa: E402
from pretrainlab.config import DataConfig  # noqa: E402
from pretrainlab.data.catalog import dataset_dir  # noqa: E402
from pretrainlab.data.dataset import load_split_numpy  # noqa: E402
from pretrainlab.data.errors import DatasetError  # noqa: E402
from pretrainlab.data.transforms import PipelineError, eval_pipeline, normalize  # noqa: E402
from pretrainlab.inference.loading import LoadedModel, load_model  # noqa: E402
from pretrainlab.models.backbones import BackboneError  # noqa: E402
from pretrainlab.tracking.mlflow import TrackingError, client_for, resolve_tracking_uri  # noqa: E402
from pretrainlab.train.checkpoint import CheckpointError  # noqa: E402


class AnalysisError(ValueError):
    """A bad argument or a model the tool cannot analyse; the message names it."""


ERRORS = (CheckpointError, DatasetError, PipelineError, TrackingError, BackboneError, AnalysisError)


def report_error(err: Exception) -> int:
    """Print ``error: ...`` on stderr; the exit code of a bad input."""
    message = err.message if isinstance(err, MlflowException) else str(err)
    print(f"error: {message}", file=sys.stderr)
    return 2


def check_mlflow_run(args: argparse.Namespace) -> None:
    """Fail before any work when ``--mlflow-run`` names a run the store does not have."""
    if args.mlflow_run:
        uri = resolve_tracking_uri(args.tracking_uri)
        try:
            client_for(uri).get_run(args.mlflow_run)
        except MlflowException as err:
            raise AnalysisError(
                f"--mlflow-run {args.mlflow_run}: not a run of the MLflow store at {uri} ({err.message})"
            ) from None


def stratified_indices(labels: np.ndarray, num: int, seed: int = 0) -> np.ndarray:
    """``num`` row indices (all rows when there are fewer), each class in proportion to its share.

    Each class's rows are shuffled with ``seed`` and spread evenly over ``[0, 1)``; the
    ``num`` smallest positions are taken, so every prefix of the order is stratified.
    """
    labels = np.asarray(labels)
    if num >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    position = np.empty(len(labels))
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        position[rows] = (np.arange(len(rows)) + rng.random()) / len(rows)
    order = np.lexsort((rng.random(len(labels)), position))
    return np.sort(order[:num])


def eval_images(images: np.ndarray, data: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images through the evaluation pipeline: ``(as seen, uint8; normalised model input)``."""
    seen = eval_pipeline(data)(torch.from_numpy(images))
    return seen, normalize(seen, data)


def load_subset(source: str, split: str, num: int, seed: int, tracking_uri: str | None = None):
    """The model of ``source`` and a stratified sample of ``split``: ``(loaded, images, labels, row indices)``."""
    loaded = load_model(source, tracking_uri=tracking_uri)
    images, labels = load_split_numpy(dataset_dir(loaded.config), split)
    chosen = stratified_indices(labels, num, seed)
    return loaded, images[chosen], labels[chosen], chosen


def backbone_of(loaded: LoadedModel) -> nn.Module:
    backbone = getattr(loaded.model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise AnalysisError(f"{type(loaded.model).__name__} has no backbone module to take features from")
    return backbone


@torch.no_grad()
def features(loaded: LoadedModel, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Pooled backbone features (the classification head's input) of uint8 images, ``N x num_features``."""
    backbone = backbone_of(loaded).eval()
    out = []
    for start in range(0, len(images), batch_size):
        _, batch = eval_images(images[start : start + batch_size], loaded.config.data)
        out.append(backbone(batch).float().flatten(1).cpu())
    return torch.cat(out).numpy()


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

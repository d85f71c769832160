"""The pictures an evaluation logs: a confusion matrix, a t-SNE of features, a grid of test samples with
predictions (captions, answers, boxes). Figures are built without pyplot's global state.

matplotlib and scikit-learn are imported by the functions that draw: every Ray Train worker imports the
evaluation table for its per-epoch validation, which never draws, and the two would add about 1.8 s to its start.
"""

from __future__ import annotations

import csv
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_IMAGES = 16
COLUMNS = 4
LINES_EACH = 3
"""Printed lines per text line at most; longer text is cut with "..."."""
PRED_COLOUR, REF_COLOUR = "red", "lime"


def _draw_box(ax, box: Sequence[float], colour: str, style: str) -> None:
    from matplotlib.patches import Rectangle

    x1, y1, x2, y2 = (float(v) for v in box)
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linewidth=2, linestyle=style))


def plot_samples(
    images: np.ndarray,
    lines: Sequence[Sequence[str]],
    boxes: Sequence[tuple[Sequence[float], Sequence[float]]] | None = None,
) -> Figure:
    """Up to 16 images in a grid of 4 columns, each with its lines of text below it.

    Args:
        images: uint8 ``N x C x H x W`` (1 or 3 channels).
        lines: The text under each image, e.g. ``["pred: ...", "ref: ..."]``; long lines are wrapped, then cut.
        boxes: Optional ``(predicted box, reference box)`` per image, pixel ``x1, y1, x2, y2``.

    Raises:
        ValueError: ``lines`` or ``boxes`` not one per image, or images not ``N x C x H x W`` with 1 or 3 channels.
    """
    from matplotlib.figure import Figure

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or not len(images):
        raise ValueError(f"images must be N x C x H x W with N >= 1 and 1 or 3 channels, got shape {images.shape}")
    if len(lines) != len(images) or (boxes is not None and len(boxes) != len(images)):
        got = f"{len(lines)} lists of lines" + ("" if boxes is None else f" and {len(boxes)} box pairs")
        raise ValueError(f"got {got} for {len(images)} images; one per image")
    count = min(len(images), MAX_IMAGES)
    columns = min(COLUMNS, count)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(3.2 * columns, 4.8 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= count:
            continue
        pixels = images[i].transpose(1, 2, 0)
        ax.imshow(pixels[..., 0] if pixels.shape[2] == 1 else pixels, cmap="gray", vmin=0, vmax=255)
        if boxes is not None:
            pred, ref = boxes[i]
            _draw_box(ax, ref, REF_COLOUR, "-")
            _draw_box(ax, pred, PRED_COLOUR, "--")
        text = "\n".join(textwrap.fill(line, 36, max_lines=LINES_EACH, placeholder=" ...") for line in lines[i])
        ax.text(0.0, -0.03, text, transform=ax.transAxes, va="top", ha="left", fontsize=7, wrap=False)
    if boxes is not None:
        fig.suptitle("boxes: predicted (red, dashed), reference (green)", fontsize=9)
    fig.tight_layout()
    return fig


def save_confusion_matrix(
    matrix: np.ndarray, class_names: list[str], folder: str | os.PathLike, title: str = ""
) -> list[Path]:
    """Write ``confusion_matrix.png`` (counts in cells, coloured by count) and ``confusion_matrix.csv``."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png, table = folder / "confusion_matrix.png", folder / "confusion_matrix.csv"
    size = max(6.0, 0.6 * len(class_names))
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(ax=ax, xticks_rotation=45, colorbar=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true\\pred", *class_names])
        writer.writerows([name, *row] for name, row in zip(class_names, matrix.tolist(), strict=True))
    return [png, table]


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


def tsne_embed(feats: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """2-D t-SNE of ``feats`` (PCA initialisation, automatic learning rate).

    Raises:
        ValueError: Fewer than 2 samples, or a perplexity outside ``(0, samples)``.
    """
    from sklearn.manifold import TSNE

    if len(feats) < 2:
        raise ValueError(f"t-SNE needs at least 2 samples, got {len(feats)}")
    if not 0 < perplexity < len(feats):
        raise ValueError(f"--perplexity must be between 0 and the number of samples ({len(feats)}), not {perplexity}")
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(feats.astype(np.float64))


def tsne_plot(points: np.ndarray, labels: np.ndarray, class_names: list[str], title: str) -> Figure:
    """Scatter of the points, one colour per class, with a legend of class names."""
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 7))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
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

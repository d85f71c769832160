"""Confusion matrix of a classifier's predictions, as a PNG and a CSV table."""

from __future__ import annotations

import csv
import os
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
    """Write ``confusion_matrix.png`` (row-normalised colours, counts in cells) and ``confusion_matrix.csv``."""
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

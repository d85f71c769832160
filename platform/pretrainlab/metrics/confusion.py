"""Confusion matrices: counts of (true class, predicted class) pairs."""

from __future__ import annotations

import numpy as np


def confusion_counts(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]`` over ``num_classes`` classes (``num_classes x num_classes``, int64)."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    if labels.shape != preds.shape:
        raise ValueError(f"{labels.shape[0]} labels but {preds.shape[0]} predictions")
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def normalize_rows(matrix: np.ndarray, decimals: int = 3) -> np.ndarray:
    """Each row divided by its true-class total (rows of an absent class stay 0), rounded."""
    return np.round(matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1), decimals)

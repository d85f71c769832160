"""Parallel-coordinates plot of a sweep: one axis per hyperparameter and one for the metric, a line per trial."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot(
    table: pd.DataFrame, params: Sequence[str], metric: str, path: str | os.PathLike, log_axes: Sequence[str] = ()
) -> Path:
    """Writes the plot of ``table`` (a row per trial) to ``path``; lines are coloured by ``metric``.

    Numeric axes are scaled to [0, 1] between their min and max (log-scaled for ``log_axes``);
    other values are placed at evenly spaced categories, labelled on the axis.
    """
    columns = [*params, metric]
    positions = pd.DataFrame(index=table.index)
    labels: dict[str, list[tuple[float, str]]] = {}
    for column in columns:
        values = table[column]
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().all():
            scaled = numeric.map(math.log10) if column in log_axes else numeric
            low, high = scaled.min(), scaled.max()
            positions[column] = (scaled - low) / (high - low) if high > low else 0.5
            labels[column] = [(0.0, f"{numeric.min():.3g}"), (1.0, f"{numeric.max():.3g}")]
        else:
            categories = sorted(values.astype(str).unique())
            step = 1 / max(1, len(categories) - 1)
            positions[column] = values.astype(str).map({c: i * step for i, c in enumerate(categories)})
            labels[column] = [(i * step, c) for i, c in enumerate(categories)]
    scores = pd.to_numeric(table[metric], errors="coerce")
    colours = plt.cm.viridis((scores - scores.min()) / ((scores.max() - scores.min()) or 1))

    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(columns), 4.5))
    for row, colour in zip(positions.itertuples(index=False), colours, strict=True):
        ax.plot(range(len(columns)), list(row), color=colour, alpha=0.85, linewidth=1.8)
    for x, column in enumerate(columns):
        ax.axvline(x, color="grey", linewidth=0.8)
        for y, text in labels[column]:
            ax.annotate(text, (x, y), xytext=(4, 0), textcoords="offset points", fontsize=7, va="center")
    ax.set_xticks(range(len(columns)), columns, rotation=15)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{len(table)} trials, coloured by {metric}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

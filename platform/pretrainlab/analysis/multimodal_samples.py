"""A grid of test images with text under each (predicted vs reference captions or answers) and, for grounding,
the predicted box (red, dashed) over the reference box (green)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

MAX_IMAGES = 16
COLUMNS = 4
LINES_EACH = 3
"""Printed lines per text line at most; longer text is cut with "..."."""
PRED_COLOUR, REF_COLOUR = "red", "lime"


def _draw_box(ax, box: Sequence[float], colour: str, style: str) -> None:
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

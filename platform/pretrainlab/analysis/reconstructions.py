"""Masked image modelling at a glance: rows of original | masked | reconstruction, saved as a PNG.

    from pretrainlab.analysis.reconstructions import save_reconstructions
    save_reconstructions(model, images, mask, "recon.png", mean=cfg.data.mean, std=cfg.data.std)

``model`` is an MAE or SimMIM model (any module with ``reconstruct(images, mask) -> images``),
``images`` a fixed batch normalised as the model is trained on, ``mask`` its bool ``N x h x w``
patch masks (True = masked), as :func:`pretrainlab.data.masks.make_masks` makes them. The
reconstruction shows the model's pixels in the masked patches and the input's in the visible ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

PANEL_INCHES = 1.6
"""Width and height of each image panel."""
DPI = 100
COLUMNS = ("original", "masked", "reconstruction")
MASK_GREY = 0.5
"""The value masked patches are drawn with (display range [0, 1])."""


def denormalize(images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> np.ndarray:
    """``N x C x H x W`` normalised images to ``N x H x W x C`` floats in [0, 1]: ``x * std + mean``, clipped."""
    channels = images.shape[1]
    mean_t = torch.tensor(mean if mean is not None else [0.0] * channels).view(1, -1, 1, 1)
    std_t = torch.tensor(std if std is not None else [1.0] * channels).view(1, -1, 1, 1)
    return (images.detach().cpu().float() * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def pixel_mask(mask: torch.Tensor, height: int, width: int) -> np.ndarray:
    """A bool ``N x h x w`` patch mask blown up to ``N x H x W`` pixels."""
    rows, cols = mask.shape[1:]
    pixels = mask.detach().cpu().repeat_interleave(height // rows, dim=1).repeat_interleave(width // cols, dim=2)
    return pixels.numpy()


@torch.no_grad()
def reconstruction_panels(
    model: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(original, masked, reconstruction)``, each ``N x H x W x C`` in [0, 1], the model in eval mode."""
    was_training = model.training
    model.eval()
    try:
        rebuilt = model.reconstruct(images, mask)
    finally:
        model.train(was_training)
    original = denormalize(images, mean, std)
    hidden = pixel_mask(mask, *images.shape[-2:])
    masked = np.where(hidden[..., None], MASK_GREY, original)
    return original, masked, denormalize(rebuilt, mean, std)


def save_reconstructions(
    model: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor,
    out: str | Path,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Path:
    """Draw one row per image (original | masked | reconstruction) and save it as a PNG.

    The figure is ``3 x PANEL_INCHES`` wide and ``N x PANEL_INCHES`` tall at ``DPI`` dots per inch.

    Args:
        model: Has ``reconstruct(images, mask) -> images`` (MAE, SimMIM).
        images: ``N x C x H x W``, normalised with ``mean`` / ``std`` (``data.mean`` / ``data.std``).
        mask: Bool ``N x h x w`` patch masks, True = masked.
        out: The PNG's path (folders are created).

    Returns:
        ``out`` as a Path.
    """
    panels = reconstruction_panels(model, images, mask, mean, std)
    count = len(images)
    fig, axes = plt.subplots(
        count, len(COLUMNS), figsize=(PANEL_INCHES * len(COLUMNS), PANEL_INCHES * count), squeeze=False
    )
    for row in range(count):
        for column, (title, panel) in enumerate(zip(COLUMNS, panels, strict=True)):
            _draw(axes[row, column], panel[row], title if row == 0 else None)
    fig.tight_layout(pad=0.3)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _draw(ax: plt.Axes, image: np.ndarray, title: str | None) -> None:
    """One ``H x W x C`` image in [0, 1], grey-scale when it has one channel, without ticks."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(image)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)

"""A one-stage visual grounding head: the image cell that holds the referred object's centre, and its box.

Anchor-free, as one-stage grounding models (FAOA) and CenterNet: a query (the decoder's state after the
referring expression) scores every cell of the image's token grid by a scaled dot product, and a small MLP
reads the box off one cell (its centre inside the cell, its width and height over the image). Training picks
the cell by cross-entropy against the cell of the true centre and fits the box at that cell (L1 + GIoU, as
DETR weighs them); prediction takes the best-scoring cell.

Boxes are ``x1, y1, x2, y2`` as fractions of the image's width and height.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss

L1_WEIGHT = 5.0
GIOU_WEIGHT = 2.0


class CellBoxHead(nn.Module):
    """Scores ``rows x cols`` image cells against a query and regresses a box from a cell."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.regress = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, 4))

    def cell_logits(self, query: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """``M x cells`` scores of each query (``M x width``) against its image's cells (``M x cells x width``)."""
        return torch.einsum("mw,mcw->mc", self.query(query), self.key(cells)) / math.sqrt(self.width)

    def box_at(
        self, query: torch.Tensor, cells: torch.Tensor, index: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """``M x 4`` boxes read off cell ``index[m]`` of each query's image (``grid``: rows, cols)."""
        rows, cols = grid
        picked = cells[torch.arange(len(index), device=index.device), index]
        offset_x, offset_y, width, height = self.regress(torch.cat([picked, query], dim=1)).float().sigmoid().unbind(1)
        centre_x = ((index % cols) + offset_x) / cols
        centre_y = (torch.div(index, cols, rounding_mode="floor") + offset_y) / rows
        centre, size = torch.stack([centre_x, centre_y], 1), torch.stack([width, height], 1)
        return torch.cat([centre - size / 2, centre + size / 2], 1)

    def loss(
        self, query: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int], target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The training loss for target boxes ``target`` (``M x 4``): ``loss`` and its parts."""
        rows, cols = grid
        centre = (target[:, :2] + target[:, 2:]) / 2
        col = (centre[:, 0] * cols).long().clamp(0, cols - 1)
        row = (centre[:, 1] * rows).long().clamp(0, rows - 1)
        index = row * cols + col
        logits = self.cell_logits(query, cells).float()
        cell_loss = F.cross_entropy(logits, index)
        box = self.box_at(query, cells, index, grid)
        l1 = F.l1_loss(box, target)
        giou = generalized_box_iou_loss(box, target, reduction="mean")
        return {
            "loss": cell_loss + L1_WEIGHT * l1 + GIOU_WEIGHT * giou,
            "cell_loss": cell_loss.detach(),
            "l1": l1.detach(),
            "giou_loss": giou.detach(),
            "cell_accuracy": (logits.argmax(dim=1) == index).float().mean(),
        }

    def predict(
        self, query: torch.Tensor, cells: torch.Tensor, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(``M x 4`` boxes from each query's best cell, clipped to the image; the softmax probability of that cell)."""
        probability, index = self.cell_logits(query, cells).float().softmax(dim=1).max(dim=1)
        return self.box_at(query, cells, index, grid).clamp(0, 1), probability

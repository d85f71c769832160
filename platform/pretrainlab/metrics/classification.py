"""Classification metrics, accumulated as sums so that workers can add theirs together."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def classification_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[summed loss, top-1 hits, top-5 hits, count]`` for one batch, as float64."""
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hits = topk == labels[:, None]
    return torch.tensor(
        [
            F.cross_entropy(logits.float(), labels, reduction="sum").item(),
            hits[:, 0].sum().item(),
            hits.any(dim=1).sum().item(),
            labels.numel(),
        ],
        dtype=torch.float64,
    )


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """Mean loss and top-1 / top-5 accuracy in percent."""
    loss, top1, top5, count = sums.tolist()
    if count == 0:
        raise ValueError("no samples were evaluated")
    return {"loss": loss / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}


def evaluate_logits(logits: torch.Tensor, labels: Iterable[int] | torch.Tensor) -> dict[str, float]:
    """Loss, top-1 and top-5 of precomputed logits."""
    return metrics_from_sums(classification_sums(logits, torch.as_tensor(labels, dtype=torch.long)))

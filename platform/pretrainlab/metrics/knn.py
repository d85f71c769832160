"""k-nearest-neighbour classification of features (the self-supervised evaluation protocol of InstDisc / DINO).

Features are L2-normalised; each query takes the ``k`` most cosine-similar bank entries and
sums, per class, the votes ``exp(similarity / temperature)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    exclude_self: bool = False,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (``len(queries) x num_classes``) of temperature-weighted kNN votes.

    Args:
        queries, bank: ``N x D`` and ``M x D`` features (normalised here).
        bank_labels: ``M`` class ids.
        exclude_self: The queries are the bank itself (leave-one-out): a query never votes for itself.
        chunk: Queries scored at a time, to bound memory.
    """
    if bank_labels.numel() != bank.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} features but {bank_labels.numel()} labels")
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0] - int(exclude_self))
    scores = []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start : start + chunk] @ bank.T
        if exclude_self:
            rows = torch.arange(similarity.shape[0])
            similarity[rows, rows + start] = -float("inf")
        top, index = similarity.topk(k, dim=1)
        votes = torch.zeros(similarity.shape[0], num_classes)
        votes.scatter_add_(1, bank_labels[index], (top / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_top1(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    exclude_self: bool = False,
) -> float:
    """Top-1 accuracy in percent of :func:`knn_predict`."""
    scores = knn_predict(queries, bank, bank_labels, num_classes, k, temperature, exclude_self)
    return 100.0 * (scores.argmax(dim=1) == query_labels).float().mean().item()

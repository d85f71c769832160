"""Heads that PretrainLab puts on headless backbones."""

from __future__ import annotations

import torch
from torch import nn


class LinearClsHead(nn.Module):
    """Dropout then one linear layer: features to class logits (MMPreTrain's ``LinearClsHead``)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))

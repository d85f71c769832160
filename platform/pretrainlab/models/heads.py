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


class MLPHead(nn.Module):
    """``num_layers`` linear layers with BatchNorm + ReLU between them: the projectors and predictors of
    SimCLR, MoCo v3, BYOL, SimSiam, Barlow Twins and DINO.

    Args:
        in_dim, hidden_dim, out_dim: Widths of the input, the hidden layers and the output.
        num_layers: Linear layers in all (1 is a single linear map).
        last_bn: BatchNorm (without affine parameters) after the last layer, as SimSiam's and MoCo v3's
            projectors have.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths, widths[1:], strict=False)):
            last = i == num_layers - 1
            layers.append(nn.Linear(width_in, width_out, bias=last and not last_bn))
            if not last:
                layers += [nn.BatchNorm1d(width_out), nn.ReLU(inplace=True)]
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)

"""What the self-supervised strategies share: momentum encoders and their schedule, the two-view check.

Their collectives across Ray Train workers are in :mod:`pretrainlab.distributed`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pretrainlab.config import ExperimentConfig


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's schedule: ``final - (final - base) * (cos(pi * step / total) + 1) / 2``, from ``base`` to ``final``."""
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` without gradients, to be moved by :func:`momentum_update` (target / teacher)."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online``, parameter by parameter; buffers are copied."""
    target_params = list(target.parameters())
    online_params = [p.detach() for p in online.parameters()]
    torch._foreach_lerp_(target_params, online_params, 1 - momentum)
    for target_buffer, online_buffer in zip(target.buffers(), online.buffers(), strict=True):
        target_buffer.copy_(online_buffer)


def check_two_views(cfg: ExperimentConfig) -> None:
    """Raise when ``data.views`` does not give exactly two views per image (SimCLR, MoCo v3, BYOL, ...)."""
    count = sum(view.count for view in cfg.data.views)
    if count != 2:
        raise ValueError(f"data.views: {cfg.strategy} needs 2 views, got {count}")

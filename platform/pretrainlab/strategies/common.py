"""What the self-supervised strategies share: collectives across Ray Train workers, momentum encoders.

Every function works both inside a ``torch.distributed`` process group (the one Ray Train sets
up for its workers) and without one (a single worker, a test, a notebook).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from pretrainlab.config import ExperimentConfig


def distributed() -> bool:
    """Whether a process group with more than one member is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """This worker's rank and the number of workers (0, 1 without a process group)."""
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every worker's ``tensor`` concatenated along dim 0 in rank order; gradients flow back to each worker's own.

    All workers must pass tensors of the same shape.
    """
    if not distributed():
        return tensor
    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over workers (a copy; no gradient)."""
    if not distributed():
        return tensor.detach().clone()
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


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

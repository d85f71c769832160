"""Collectives across Ray Train workers.

Every function works both inside a ``torch.distributed`` process group (the one Ray Train sets
up for its workers) and without one (a single worker, a test, a notebook).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


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


def all_reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    """Add the sums of every worker (a no-op outside a process group)."""
    if not distributed():
        return sums
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    total = sums.to(device)
    dist.all_reduce(total)
    return total.cpu()


def gather_from_workers(value: Any) -> list[Any]:
    """Every worker's ``value`` (any picklable object), in rank order (``[value]`` outside a process group)."""
    if not distributed():
        return [value]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every worker's rows of ``tensor`` (any count per worker), concatenated in rank order (itself outside a
    process group)."""
    if not distributed():
        return tensor
    return torch.cat(gather_from_workers(tensor.cpu()))

"""Collectives across Ray Train workers that also work without a process group (one worker, a test, a notebook)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def in_process_group() -> bool:
    """Whether a ``torch.distributed`` process group is running (of any size)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    """Add the sums of every worker (a no-op outside a process group)."""
    if in_process_group():
        device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        total = sums.to(device)
        dist.all_reduce(total)
        return total.cpu()
    return sums


def gather_from_workers(value: Any) -> list[Any]:
    """Every worker's ``value`` (any picklable object), in rank order (``[value]`` outside a process group)."""
    if not in_process_group() or dist.get_world_size() == 1:
        return [value]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)
    return parts


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every worker's rows of ``tensor`` (any count per worker), concatenated in rank order (itself outside a
    process group)."""
    if not in_process_group() or dist.get_world_size() == 1:
        return tensor
    return torch.cat(gather_from_workers(tensor.cpu()))

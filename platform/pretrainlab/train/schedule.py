"""Per-iteration learning-rate schedules: linear warmup, then cosine, constant, step or one-cycle."""

from __future__ import annotations

import bisect
import math

import torch

from pretrainlab.config import ScheduleConfig


def _cosine(start: float, end: float, progress: float) -> float:
    """From ``start`` at progress 0 to ``end`` at progress 1 along a half cosine."""
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: ScheduleConfig, steps_per_epoch: int = 1) -> float:
    """The multiplier of the base learning rate at iteration ``step`` (0-based).

    ``steps_per_epoch`` places the ``step`` schedule's milestones (given in epochs).
    """
    if cfg.name == "onecycle":  # the peak at step warmup_steps - 1, the end at the last step, as in OneCycleLR
        peak = max(1, warmup_steps - 1)
        if step <= peak:
            return _cosine(cfg.warmup_start_factor, 1.0, step / peak)
        return _cosine(1.0, cfg.min_lr_ratio, (step - peak) / max(1, total_steps - 1 - peak))
    if step < warmup_steps:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        drops = bisect.bisect_right([round(m * steps_per_epoch) for m in cfg.milestones], step)
        return cfg.gamma**drops
    return _cosine(1.0, cfg.min_lr_ratio, (step - warmup_steps) / max(1, total_steps - warmup_steps))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per iteration over ``epochs * steps_per_epoch`` iterations."""
    total = steps_per_epoch * epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg, steps_per_epoch)
    )

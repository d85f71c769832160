"""Per-iteration learning-rate schedules: linear warmup, then cosine decay or constant."""

from __future__ import annotations

import math

import torch

from pretrainlab.config import ScheduleConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: ScheduleConfig) -> float:
    """The multiplier of the base learning rate at iteration ``step`` (0-based)."""
    if step < warmup_steps:
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * step / warmup_steps
    if cfg.name == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` stepped once per iteration over ``epochs * steps_per_epoch`` iterations."""
    total = steps_per_epoch * epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, cfg))

"""Learning-rate schedules."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pretrainlab.config import ScheduleConfig
from pretrainlab.train.schedule import build_scheduler, lr_factor


def test_warmup_then_cosine_to_min():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1, warmup_start_factor=0.1, min_lr_ratio=0.01)
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup, cfg) == pytest.approx(0.1)
    assert lr_factor(5, total, warmup, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(10, total, warmup, cfg) == pytest.approx(1.0)
    assert lr_factor(55, total, warmup, cfg) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(100, total, warmup, cfg) == pytest.approx(0.01)
    values = [lr_factor(s, total, warmup, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_scheduler_steps_per_iteration():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.2)
    scheduler = build_scheduler(optimizer, ScheduleConfig(warmup_epochs=0, name="cosine"), steps_per_epoch=4, epochs=2)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)]
    assert lrs == pytest.approx(expected)


def test_constant_schedule_after_warmup():
    cfg = ScheduleConfig(name="constant", warmup_epochs=1, warmup_start_factor=0.5)
    assert [lr_factor(s, 10, 2, cfg) for s in (0, 1, 2, 9)] == pytest.approx([0.5, 0.75, 1.0, 1.0])

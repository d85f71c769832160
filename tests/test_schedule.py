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


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def _optimizer() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)


def test_step_schedule_equals_multistep_lr_per_iteration():
    cfg = ScheduleConfig(name="step", milestones=[1, 2.5], gamma=0.2)
    ours = build_scheduler(_optimizer(), cfg, steps_per_epoch=4, epochs=4)
    reference = _optimizer()
    torch_lrs = _lrs(torch.optim.lr_scheduler.MultiStepLR(reference, milestones=[4, 10], gamma=0.2), 16)
    assert _lrs(ours, 16) == pytest.approx(torch_lrs)
    assert torch_lrs[3:5] == pytest.approx([0.4, 0.08]) and torch_lrs[10] == pytest.approx(0.016)


def test_step_schedule_after_warmup():
    cfg = ScheduleConfig(name="step", milestones=[2], gamma=0.5, warmup_epochs=1, warmup_start_factor=0.5)
    assert [lr_factor(s, 40, 10, cfg, steps_per_epoch=10) for s in (0, 5, 10, 19, 20, 39)] == pytest.approx(
        [0.5, 0.75, 1.0, 1.0, 0.5, 0.5]
    )


def test_onecycle_equals_torch_one_cycle_lr():
    cfg = ScheduleConfig(name="onecycle", warmup_epochs=0.75, warmup_start_factor=0.04, min_lr_ratio=0.002)
    ours = build_scheduler(_optimizer(), cfg, steps_per_epoch=20, epochs=3)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        _optimizer(),
        max_lr=0.4,
        total_steps=60,
        pct_start=15 / 60,
        anneal_strategy="cos",
        cycle_momentum=False,
        div_factor=1 / 0.04,
        final_div_factor=0.04 / 0.002,
    )
    assert _lrs(ours, 60) == pytest.approx(_lrs(reference, 60), rel=1e-6)


def test_schedule_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="milestones"):
        ScheduleConfig(name="step")
    with pytest.raises(ValueError, match="milestones must increase"):
        ScheduleConfig(name="step", milestones=[3, 1])
    with pytest.raises(ValueError, match="warmup_epochs"):
        ScheduleConfig(name="onecycle")

"""Learning-rate schedule and batch transforms."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pretrainlab.config import DataConfig, ScheduleConfig
from pretrainlab.data.transforms import BatchTransform, random_crop, random_horizontal_flip
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


def test_random_crop_keeps_pixels_and_shifts_within_padding():
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    generator = torch.Generator().manual_seed(0)
    cropped = random_crop(images, 2, generator)
    assert cropped.shape == images.shape
    for original, crop in zip(images, cropped, strict=True):
        inside = crop[crop > 0]
        assert set(inside.tolist()) <= set(original.flatten().tolist())
        assert inside.numel() >= 4 * 4  # at most 2 rows and 2 columns are padding
    assert torch.equal(random_crop(images, 0), images)


def test_flip_flips_about_half():
    images = torch.arange(1000 * 4, dtype=torch.float32).view(1000, 1, 1, 4)
    flipped = random_horizontal_flip(images, torch.Generator().manual_seed(0))
    changed = (flipped != images).flatten(1).any(1)
    assert 400 < changed.sum() < 600
    assert torch.equal(flipped[changed], images[changed].flip(-1))


def test_batch_transform_normalises_and_resizes():
    cfg = DataConfig(mean=[0.5], std=[0.25], image_size=16)
    images = torch.full((3, 1, 8, 8), 255, dtype=torch.uint8)
    out = BatchTransform(cfg, train=False)(images)
    assert out.shape == (3, 1, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 2.0))
    with pytest.raises(ValueError, match="uint8"):
        BatchTransform(cfg, train=False)(images.float())

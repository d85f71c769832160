"""Patch-mask generators for masked image modelling (MAE's random masking, SimMIM/BEiT block masking)."""

from __future__ import annotations

import math

import numpy as np

from pretrainlab.config import MaskConfig


def random_patch_mask(grid: tuple[int, int], ratio: float, rng: np.random.Generator) -> np.ndarray:
    """MAE-style: exactly ``round(ratio * patches)`` patches masked, chosen uniformly; True = masked."""
    rows, cols = grid
    total = rows * cols
    mask = np.zeros(total, dtype=bool)
    mask[rng.permutation(total)[: round(ratio * total)]] = True
    return mask.reshape(rows, cols)


def block_patch_mask(
    grid: tuple[int, int], ratio: float, rng: np.random.Generator, min_block: int = 4, max_aspect: float = 3.0
) -> np.ndarray:
    """BEiT/SimMIM-style: random rectangles of patches until ``round(ratio * patches)`` are masked."""
    rows, cols = grid
    target = round(ratio * rows * cols)
    mask = np.zeros(grid, dtype=bool)
    log_aspect = (-math.log(max_aspect), math.log(max_aspect))
    while mask.sum() < target:
        remaining = target - int(mask.sum())
        area = rng.uniform(min(min_block, remaining), max(min_block, remaining))
        aspect = math.exp(rng.uniform(*log_aspect))
        h = min(rows, max(1, round(math.sqrt(area * aspect))))
        w = min(cols, max(1, round(math.sqrt(area / aspect))))
        top, left = rng.integers(0, rows - h + 1), rng.integers(0, cols - w + 1)
        block = mask[top : top + h, left : left + w]
        fresh = np.flatnonzero(~block.ravel())
        if fresh.size > remaining:  # fill only what is still needed, so the ratio is exact
            keep = np.zeros(block.size, dtype=bool)
            keep[rng.choice(fresh, remaining, replace=False)] = True
            block |= keep.reshape(block.shape)
        else:
            block[:] = True
    return mask


MASK_GENERATORS = {"random": random_patch_mask, "block": block_patch_mask}


def make_masks(cfg: MaskConfig, count: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` boolean masks of shape ``(height // patch, width // patch)``; True marks a masked patch."""
    if height % cfg.patch_size or width % cfg.patch_size:
        raise ValueError(f"data.mask.patch_size {cfg.patch_size} does not divide the {height}x{width} images")
    grid = (height // cfg.patch_size, width // cfg.patch_size)
    generate = MASK_GENERATORS[cfg.kind]
    return np.stack([generate(grid, cfg.ratio, rng) for _ in range(count)])

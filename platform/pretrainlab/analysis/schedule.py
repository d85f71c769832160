"""Learning rate, momentum and weight decay at every iteration of a config's schedule, without training.

    python -m pretrainlab.analysis.schedule configs/resnet10t_1xb128_fmnist.yaml [--set schedule.warmup_epochs=2]
    python -m pretrainlab.analysis.schedule CONFIG --steps-per-epoch 100 --out lr.png     # or --out lr.csv

The optimizer (``train/optim.py``) is built over one dummy parameter and stepped with the
config's scheduler (``train/schedule.py``) through ``train.epochs`` x steps per epoch
iterations, recording the values each iteration trains with. Steps per epoch are what the
training loop runs: full batches per worker, ``(train count // num_workers) // batch_size``,
with the train count from the prepared dataset; give ``--steps-per-epoch`` when the
dataset is not prepared here (or to override it). ``--out *.png`` plots them,
``--out *.csv`` writes the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import nn  # noqa: E402

from pretrainlab.analysis.outputs import add_output_arguments, publish, write_csv  # noqa: E402
from pretrainlab.config import ConfigError, ExperimentConfig, load_config  # noqa: E402
from pretrainlab.data.errors import DatasetError  # noqa: E402
from pretrainlab.train import loop  # noqa: E402
from pretrainlab.train.optim import build_optimizer, scaled_lr  # noqa: E402
from pretrainlab.train.schedule import build_scheduler  # noqa: E402

COLUMNS = ["iteration", "epoch", "lr", "momentum", "weight_decay"]


class ScheduleError(ValueError):
    """The schedule cannot be laid out; the message says why."""


def steps_per_epoch(cfg: ExperimentConfig, given: int | None) -> tuple[int, str]:
    """``given``, else the training loop's count from the prepared dataset; and where it came from."""
    if given is not None:
        if given < 1:
            raise ScheduleError(f"--steps-per-epoch must be >= 1, got {given}")
        return given, "given with --steps-per-epoch"
    from pretrainlab.data.catalog import dataset_location, prepared_location
    from pretrainlab.data.shards import load_manifest

    folder = prepared_location(cfg)
    if folder is None:
        raise ScheduleError(
            f"dataset {cfg.data.dataset!r} is not prepared (no manifest.json in {dataset_location(cfg)}); "
            "give --steps-per-epoch N"
        )
    splits = load_manifest(folder)["splits"]
    if "train" not in splits:
        raise ScheduleError(f"{folder}: no train split; give --steps-per-epoch N")
    count, workers, batch = splits["train"]["count"], cfg.train.num_workers, cfg.train.batch_size
    accumulate = cfg.train.accumulate_steps
    try:
        steps = loop.steps_per_epoch(count, batch, workers, accumulate)
    except ValueError as err:
        raise ScheduleError(str(err)) from None
    return steps, f"{count} train images / ({workers} workers x batch {batch} x {accumulate} accumulated)"


def trace(cfg: ExperimentConfig, per_epoch: int) -> list[dict]:
    """One row per iteration: the lr, momentum or beta1, and weight decay of the groups with weight decay."""
    model = nn.ModuleDict({"backbone": nn.Linear(1, 1)})
    optimizer = build_optimizer(model, cfg.optim, scaled_lr(cfg, cfg.train.num_workers))
    scheduler = build_scheduler(optimizer, cfg.schedule, per_epoch, cfg.train.epochs)
    rows = []
    for step in range(per_epoch * cfg.train.epochs):
        group = max(optimizer.param_groups, key=lambda g: g["weight_decay"])  # a group with weight decay
        momentum = group["momentum"] if "momentum" in group else group["betas"][0]
        rows.append(
            {
                "iteration": step,
                "epoch": round(step / per_epoch, 6),
                "lr": group["lr"],
                "momentum": momentum,
                "weight_decay": group["weight_decay"],
            }
        )
        optimizer.step()  # no gradients: changes nothing, keeps the scheduler's call order
        scheduler.step()
    return rows


def plot(cfg: ExperimentConfig, rows: list[dict], per_epoch: int, source: str) -> plt.Figure:
    """Three panels over iterations (lr, momentum / beta1, weight decay), epochs on the top axis."""
    steps = [row["iteration"] for row in rows]
    fig, axes = plt.subplots(3, 1, figsize=(8, 7), sharex=True, height_ratios=[2, 1, 1])
    momentum_name = "beta1" if cfg.optim.name in ("adamw", "adam", "lamb") else "momentum"
    for ax, key, label in zip(axes, COLUMNS[2:], ["lr", momentum_name, "weight decay"], strict=True):
        ax.plot(steps, [row[key] for row in rows], color="C0")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    warmup = round(cfg.schedule.warmup_epochs * per_epoch)
    if warmup:
        for ax in axes:
            ax.axvline(warmup, color="C1", linestyle="--", linewidth=1)
        axes[0].annotate(f" warmup end ({warmup} it.)", (warmup, max(row["lr"] for row in rows)), fontsize=8)
    axes[-1].set_xlabel("iteration")
    top = axes[0].secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
    top.set_xlabel("epoch")
    total = len(rows)
    axes[0].set_title(
        f"{cfg.name}: {cfg.optim.name} lr {cfg.optim.lr:g}, {cfg.schedule.name}, "
        f"{cfg.train.epochs} epochs x {per_epoch} iterations = {total}\n(steps per epoch: {source})",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML experiment config (its optim, schedule and train sections)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--steps-per-epoch", type=int, help="default: from the prepared dataset's train split")
    add_output_arguments(parser, "schedule.png")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.suffix.lower() not in (".png", ".csv"):
            raise ScheduleError(f"--out {out}: write a .png (plot) or a .csv (table)")
        cfg = load_config(args.config, args.set)
        per_epoch, source = steps_per_epoch(cfg, args.steps_per_epoch)
    except (ConfigError, DatasetError, ScheduleError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = trace(cfg, per_epoch)
    lrs = [row["lr"] for row in rows]
    print(
        f"{cfg.name}: {len(rows)} iterations ({cfg.train.epochs} epochs x {per_epoch}; {source}); "
        f"lr first {lrs[0]:.6g}, max {max(lrs):.6g} at iteration {lrs.index(max(lrs))}, last {lrs[-1]:.6g}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        write_csv(rows, COLUMNS, out)
    else:
        fig = plot(cfg, rows, per_epoch, source)
        fig.savefig(out, dpi=100)
        plt.close(fig)
    publish(out, args, "schedule")
    return 0


if __name__ == "__main__":
    sys.exit(main())

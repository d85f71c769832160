"""ASHA against running every trial to the end: compute used and best metric found, same search space, same run.

    python benchmarks/sweep_asha.py [--epochs 8]

ASHA runs with a grace period of 1 epoch and ``--reduction-factor`` (default 4, as Ray's).
Both sweeps try the same 8 grid points (learning rate x weight decay) with the same seed,
timm's tiny test ResNet on digits, 2 trials at a time on a local Ray, each logged to a
fresh MLflow sqlite store. Compute is the number of trial-epochs trained (the parent
run's ``sweep/trial_epochs``). Target: ASHA <= 50% of the compute, best metric within
1 point of the full search.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

import sweep as sweep_job  # noqa: E402

from pretrainlab.tracking.mlflow import RUN_NAME_TAG  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "test-resnet_digits_asha.yaml"
SPACE = "sweep.space={optim.lr: {grid: [0.1, 0.0003, 0.03, 0.001]}, optim.weight_decay: {grid: [0.0, 0.0005]}}"


def run(scheduler: str, epochs: int, reduction_factor: float) -> tuple[float, float, float]:
    """(trial-epochs, best val/top1, wall seconds) of one sweep."""
    start = time.perf_counter()
    overrides = [
        SPACE,
        "sweep.num_samples=1",
        f"sweep.scheduler.type={scheduler}",
        f"sweep.scheduler.reduction_factor={reduction_factor}",
        f"train.epochs={epochs}",
    ]
    code = sweep_job.main([str(CONFIG), "--name", scheduler, *[a for o in overrides for a in ("--set", o)]])
    if code != 0:
        raise SystemExit(f"the {scheduler} sweep failed with exit code {code}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("digits").experiment_id
    (parent,) = client.search_runs([experiment], filter_string=f"tags.`{RUN_NAME_TAG}` = '{scheduler}'")
    metrics = parent.data.metrics
    return metrics["sweep/trial_epochs"], metrics["sweep/best/val/top1"], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--reduction-factor", type=float, default=4.0, help="ASHA's (Ray's default: 4)")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="pretrainlab-sweep-bench-"))
    os.environ["PRETRAINLAB_HOME"] = str(home)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"

    asha = run("asha", args.epochs, args.reduction_factor)
    full = run("none", args.epochs, args.reduction_factor)
    print(f"\nASHA:        {asha[0]:.0f} trial-epochs, best val/top1 {asha[1]:.2f}, {asha[2]:.0f} s")
    print(f"no stopping: {full[0]:.0f} trial-epochs, best val/top1 {full[1]:.2f}, {full[2]:.0f} s")
    print(f"compute ratio ASHA / full: {asha[0] / full[0]:.2f} (target <= 0.50)")
    print(f"best metric gap full - ASHA: {full[1] - asha[1]:+.2f} points (target <= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

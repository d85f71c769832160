"""Fashion-MNIST test top-1 of the supervised recipes at a fixed budget: plain vs tricks, scratch vs ImageNet.

    python benchmarks/recipes_fmnist.py [--only resnet,mobilenet,vit,resnet-15e] [--set KEY=VALUE ...]

Each group trains with the same model and schedule, at the number of epochs in its configs
(the budget), through ``jobs/pretrain.py`` on a local Ray, one run after the other:

- ``resnet``: ResNet-10-T (stem stride 2), 10 epochs: plain (crop + flip) vs + RandAugment,
  mixup / cutmix, label smoothing and EMA;
- ``vit``: ViT 6 x 96, 4 x 4 patches, 6 epochs: the same two recipes;
- ``mobilenet``: MobileNetV2, 2 epochs: random init vs torchvision's ImageNet weights;
- ``resnet-15e``: the plain ResNet-10-T recipe at 15 epochs.

Every run is logged to the project's MLflow store (experiment ``fmnist-recipes``). The table
gives test top-1 / top-5 of each run's best checkpoint, its wall time, and the gain over the
first recipe of its group in points; results go to ``--out`` (JSON lines) as they finish.
Target: the best recipe reaches >= 93.0% test top-1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

import pretrain as pretrain_job  # noqa: E402

from pretrainlab.config import load_config  # noqa: E402
from pretrainlab.paths import resolve_tracking_uri  # noqa: E402
from pretrainlab.tracking.mlflow import RUN_NAME_TAG  # noqa: E402

GROUPS = {
    "resnet": ("resnet10t-s2_1xb128_fmnist", "resnet10t-s2_1xb128-tricks_fmnist"),
    "mobilenet": ("mobilenetv2_1xb128_fmnist", "mobilenetv2-in1k-pre_1xb128_fmnist"),
    "vit": ("vit-d6w96-p4_1xb128_fmnist", "vit-d6w96-p4_1xb128-tricks_fmnist"),
    "resnet-15e": ("resnet10t-s2_1xb128-15e_fmnist",),
}
TARGET = 93.0


def train(config: str, overrides: list[str]) -> dict:
    """Train one recipe; its test metrics, epochs and wall time."""
    path = REPO / "configs" / f"{config}.yaml"
    cfg = load_config(path, overrides)
    run_name = f"bench-{config}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.perf_counter()
    args = [str(path), "--run-name", run_name, *(a for o in overrides for a in ("--set", o))]
    if pretrain_job.main(args) != 0:
        raise SystemExit(f"{config}: the training job failed")
    wall = time.perf_counter() - start
    client = MlflowClient(resolve_tracking_uri(cfg.runtime.tracking_uri))
    experiment = client.get_experiment_by_name(cfg.runtime.experiment)
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    metrics = run.data.metrics
    return {
        "config": config,
        "epochs": cfg.train.epochs,
        "test_top1": metrics["test/top1"],
        "test_top5": metrics["test/top5"],
        "best_val_top1": metrics["best/val/top1"],
        "wall_s": wall,
        "mlflow_run_id": run.info.run_id,
    }


def print_table(rows: list[dict]) -> None:
    """Markdown table of the runs, with each run's gain over the first of its group in points."""
    print("\n| recipe | epochs | test top-1 | test top-5 | wall time | gain |")
    print("|---|---|---|---|---|---|")
    firsts = {row["group"]: row for row in reversed(rows)}
    for row in rows:
        first = firsts[row["group"]]
        gain = f"{row['test_top1'] - first['test_top1']:+.2f}" if row is not first else ""
        minutes, seconds = divmod(round(row["wall_s"]), 60)
        print(
            f"| {row['config']} | {row['epochs']} | {row['test_top1']:.2f}% | {row['test_top5']:.2f}% "
            f"| {minutes} min {seconds:02d} s | {gain} |"
        )
    best = max(rows, key=lambda r: r["test_top1"])
    verdict = "met" if best["test_top1"] >= TARGET else "NOT met"
    print(f"\nbest: {best['config']} at {best['test_top1']:.2f}% (target >= {TARGET}%: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS), help=f"groups to run, from {', '.join(GROUPS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in every run")
    parser.add_argument("--out", default="recipes_fmnist.jsonl", help="JSON lines, one per finished run")
    args = parser.parse_args()
    groups = [name.strip() for name in args.only.split(",")]
    if unknown := sorted(set(groups) - set(GROUPS)):
        parser.error(f"--only: unknown group(s) {', '.join(unknown)}; valid: {', '.join(GROUPS)}")
    rows = []
    with open(args.out, "a") as out:
        for group in groups:
            for config in GROUPS[group]:
                rows.append({"group": group, **train(config, args.set)})
                out.write(json.dumps(rows[-1]) + "\n")
                out.flush()
    print_table(rows)


if __name__ == "__main__":
    main()

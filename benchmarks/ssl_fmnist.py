"""Self-supervised methods on Fashion-MNIST at a fixed budget: kNN and linear-probe top-1, next to baselines.

    python benchmarks/ssl_fmnist.py [--only simclr,byol,mae] [--probe-epochs 50] [--vit-features last-blocks]
                                    [--set KEY=VALUE ...]

Each method trains its config ``configs/<method>_*_fmnist.yaml`` (the budget: the epochs in
its file, wall time measured here) through ``jobs/pretrain.py`` on a local Ray; its best
checkpoint is then evaluated by ``jobs/knn_eval.py`` (k=20, train split as bank, test split
as queries) and ``jobs/linear_probe.py`` (features cached once, SGD, best epoch on val),
both logged to MLflow as child runs of the pretraining run. Baselines measured in the same
run with the same probe: raw pixels (kNN, and scikit-learn's logistic regression) and each
backbone randomly initialised. ViT backbones are probed on DINO's linear-evaluation features (class
token of the last 4 blocks and the mean patch token; ``--vit-features pooled``: the class token
alone), ResNets on their pooled output. Targets: every method's linear probe >= its random-init
encoder + 5 points; SimCLR, BYOL and MAE >= 85% linear-probe top-1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from mlflow import MlflowClient
from sklearn.linear_model import LogisticRegression

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

import knn_eval  # noqa: E402
import linear_probe  # noqa: E402
import pretrain as pretrain_job  # noqa: E402

from pretrainlab.config import ExperimentConfig, load_config  # noqa: E402
from pretrainlab.data.catalog import dataset_dir  # noqa: E402
from pretrainlab.data.dataset import load_split_numpy  # noqa: E402
from pretrainlab.evaluation.embedding import (  # noqa: E402
    FEATURE_KINDS,
    evaluate_probe,
    extract_features,
    feature_extractor,
    train_linear_probe,
)
from pretrainlab.metrics.knn import knn_top1  # noqa: E402
from pretrainlab.paths import resolve_tracking_uri  # noqa: E402
from pretrainlab.strategies import get_strategy  # noqa: E402
from pretrainlab.tracking.mlflow import RUN_NAME_TAG  # noqa: E402

PROBE_TARGET, PROBE_METHODS, RANDOM_MARGIN = 85.0, ("simclr", "byol", "mae"), 5.0
SPLITS = ("train", "val", "test")


def method_configs() -> dict[str, Path]:
    """Strategy -> its Fashion-MNIST config (every non-supervised ``configs/*_fmnist.yaml``)."""
    found = {}
    for path in sorted((REPO / "configs").glob("*_fmnist.yaml")):
        cfg = load_config(path)
        if cfg.strategy != "supervised":
            found[cfg.strategy] = path
    return found


def child_metric(client: MlflowClient, parent: str, experiment_id: str, key: str) -> float:
    (child,) = [
        run
        for run in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        if key in run.data.metrics
    ]
    return child.data.metrics[key]


def pretrain_and_probe(
    path: Path, cfg: ExperimentConfig, overrides: list[str], probe_epochs: int, features: str
) -> dict:
    """Pretrain one method (``cfg``: ``path`` with ``overrides``), then kNN and linear-probe its checkpoint;
    the figures of its table row."""
    run_name = f"bench-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.perf_counter()
    if pretrain_job.main([str(path), "--run-name", run_name, *(a for o in overrides for a in ("--set", o))]) != 0:
        raise SystemExit(f"{path.name}: the pretraining job failed")
    wall = time.perf_counter() - start
    client = MlflowClient(resolve_tracking_uri(cfg.runtime.tracking_uri))
    experiment_id = client.get_experiment_by_name(cfg.runtime.experiment).experiment_id
    (run,) = client.search_runs([experiment_id], f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    uri = f"runs:/{run.info.run_id}/checkpoint"
    probe_args = [uri, "--epochs", str(probe_epochs), "--features", features]
    if knn_eval.main([uri, "--k", "20"]) != 0 or linear_probe.main(probe_args) != 0:
        raise SystemExit(f"{path.name}: evaluating the checkpoint failed")
    return {
        "method": cfg.strategy,
        "config": path.stem,
        "backbone": cfg.model.backbone,
        "epochs": cfg.train.epochs,
        "wall_s": wall,
        "knn_top1": child_metric(client, run.info.run_id, experiment_id, "knn/top1_k20"),
        "probe_top1": child_metric(client, run.info.run_id, experiment_id, "linear_probe/top1"),
        "probe_features": features,
        "mlflow_run_id": run.info.run_id,
    }


def random_encoder(cfg: ExperimentConfig, data: dict, probe_epochs: int, vit_features: str) -> dict:
    """kNN (pooled features) and linear-probe top-1 of ``cfg``'s backbone at its random initialisation,
    and the features its probes use (``vit_features`` for a ViT, else pooled)."""
    classes = int(data["train"][1].max()) + 1
    torch.manual_seed(cfg.runtime.seed)
    backbone = get_strategy(cfg.strategy).build_model(cfg, classes, 1, load_init_from=False).backbone
    features = vit_features if getattr(backbone, "has_class_token", False) else "pooled"
    probed = feature_extractor(backbone, features)

    def features_of(model: torch.nn.Module) -> dict:
        return {split: (extract_features(model, x, cfg.data), torch.from_numpy(y)) for split, (x, y) in data.items()}

    pooled = features_of(backbone)
    probe = pooled if probed is backbone else features_of(probed)
    knn = knn_top1(*pooled["test"], *pooled["train"], classes, k=20)
    linear, _ = train_linear_probe(*probe["train"], *probe["val"], classes, epochs=probe_epochs)
    return {"knn_top1": knn, "probe_top1": evaluate_probe(linear, *probe["test"])["top1"], "probe_features": features}


def raw_pixels(data: dict) -> dict:
    """kNN (k=20) and logistic regression on the raw pixels, scaled to [0, 1]."""
    flat = {split: (images.reshape(len(images), -1) / 255.0, labels) for split, (images, labels) in data.items()}
    (x_train, y_train), (x_test, y_test) = flat["train"], flat["test"]
    as_tensors = [torch.from_numpy(a) for a in (x_test, y_test, x_train, y_train)]
    knn = knn_top1(*as_tensors, int(y_train.max()) + 1)
    logistic = LogisticRegression(max_iter=300).fit(x_train, y_train)
    return {"knn_top1": knn, "probe_top1": 100.0 * float(np.mean(logistic.predict(x_test) == y_test))}


def print_table(rows: list[dict], baselines: dict[str, dict]) -> None:
    print("\n| method | config | epochs | wall time | kNN top-1 (k=20) | linear probe top-1 ", end="")
    print("| probe features | vs random init |")
    print("|---|---|---|---|---|---|---|---|")
    for name, base in baselines.items():
        features = base.get("probe_features", "raw (logistic regression)")
        print(f"| {name} | | | | {base['knn_top1']:.2f}% | {base['probe_top1']:.2f}% | {features} | |")
    for row in rows:
        minutes, seconds = divmod(round(row["wall_s"]), 60)
        gain = row["probe_top1"] - baselines[f"random {row['backbone']}"]["probe_top1"]
        print(
            f"| {row['method']} | {row['config']} | {row['epochs']} | {minutes} min {seconds:02d} s "
            f"| {row['knn_top1']:.2f}% | {row['probe_top1']:.2f}% | {row['probe_features']} | {gain:+.2f} |"
        )
        verdicts = [f"probe {'>=' if gain >= RANDOM_MARGIN else '<'} random + {RANDOM_MARGIN}"]
        if row["method"] in PROBE_METHODS:
            verdicts.append(f"probe {'>=' if row['probe_top1'] >= PROBE_TARGET else '<'} {PROBE_TARGET}%")
        print(f"  {row['method']}: " + ", ".join(verdicts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    configs = method_configs()
    parser.add_argument("--only", default=",".join(configs), help=f"methods to run, from {', '.join(configs)}")
    parser.add_argument("--probe-epochs", type=int, default=50, help="linear-probe epochs over cached features")
    parser.add_argument(
        "--vit-features",
        choices=FEATURE_KINDS,
        default="last-blocks",
        help="features the linear probe takes from a ViT (default: last-blocks, DINO's protocol)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in every run")
    parser.add_argument("--out", default="ssl_fmnist.jsonl", help="JSON lines, one per finished method")
    args = parser.parse_args()
    methods = [name.strip() for name in args.only.split(",")]
    if unknown := sorted(set(methods) - set(configs)):
        parser.error(f"--only: unknown method(s) {', '.join(unknown)}; valid: {', '.join(configs)}")
    torch.set_num_threads(2)

    cfgs = {method: load_config(configs[method], args.set) for method in methods}
    data = {split: load_split_numpy(dataset_dir(cfgs[methods[0]]), split) for split in SPLITS}
    baselines = {"raw pixels": raw_pixels(data)}
    for cfg in cfgs.values():
        if f"random {cfg.model.backbone}" not in baselines:
            baselines[f"random {cfg.model.backbone}"] = random_encoder(cfg, data, args.probe_epochs, args.vit_features)
    rows = []
    with open(args.out, "a") as out:
        out.write(json.dumps({"baselines": baselines}) + "\n")
        for method, cfg in cfgs.items():
            features = baselines[f"random {cfg.model.backbone}"]["probe_features"]
            rows.append(pretrain_and_probe(configs[method], cfg, args.set, args.probe_epochs, features))
            out.write(json.dumps(rows[-1]) + "\n")
            out.flush()
    print_table(rows, baselines)


if __name__ == "__main__":
    main()

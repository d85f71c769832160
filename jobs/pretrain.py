"""Pretrain one experiment on Ray Train, tracked in MLflow.

On a local Ray started for the job (the default):

    python jobs/pretrain.py configs/resnet10t_1xb128_fmnist.yaml --set optim.lr=0.05

On a running cluster (`ray start --head --node-ip-address=127.0.0.1` first):

    export RAY_AUTH_MODE=token
    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"PRETRAINLAB_HOME": "'"$PWD"'"}}' \
        -- python jobs/pretrain.py configs/resnet10t_1xb128_fmnist.yaml --set optim.lr=0.05

Passing ``--run-name`` of an earlier run resumes it from its last checkpoint, in the same
MLflow run.

The best checkpoint is evaluated on the test split at the end: top-1 / top-5 of the logits for
classification strategies; for self-supervised (embedding) strategies, kNN top-1 of the
backbone's features with the train split as the bank (``test/knn_top1_k20``,
``test/knn_top1_k200``) and a t-SNE picture of test features (``tsne/tsne_test.png``); for
image-text strategies, retrieval Recall@1/5/10 both ways on the test split and on the
compositional test split when there is one (``test/t2i_r1``, ``test_compositional/t2i_r1``, ...),
next to the shuffled-image baseline (``test/shuffled/t2i_r1``, ...); for generation strategies,
the metrics of the task the dataset teaches (captioning BLEU-4 / CIDEr, VQA accuracy, grounding
accuracy at IoU 0.5) next to its baseline (shuffled images, question only, centre box) on the same
splits, and a picture of test predictions (``evaluation/test/samples.png``).

A run whose training loss turns NaN or infinite stops before that epoch's checkpoint: the job
prints the error (the step, what to change) and exits 1; its MLflow run is marked FAILED.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import yaml
from mlflow import MlflowClient

from pretrainlab.analysis import tsne
from pretrainlab.analysis.samples import stratified_indices
from pretrainlab.checkpoint import CheckpointError, verify_checkpoint
from pretrainlab.cluster import init_ray, ray_job_tags
from pretrainlab.config import ConfigError, ExperimentConfig, load_config
from pretrainlab.data.shards import load_manifest
from pretrainlab.evaluation.classification import evaluate_checkpoint, log_evaluation
from pretrainlab.evaluation.embedding import checkpoint_features, knn_accuracies
from pretrainlab.evaluation.generation import evaluate_generation_split, generation_samples_figure
from pretrainlab.evaluation.image_text import evaluate_retrieval_split
from pretrainlab.inference.loading import load_model
from pretrainlab.paths import project_home, resolve_tracking_uri
from pretrainlab.storage import location
from pretrainlab.strategies import get_strategy
from pretrainlab.tracking.mlflow import (
    CHECKPOINT_ARTIFACT,
    MetricLogger,
    TrackingError,
    check_tracking,
    client_for,
    log_params,
    register_checkpoint,
    start_or_resume_run,
)
from pretrainlab.train.trainer import EXPERIMENT_ERRORS, build_trainer, check_experiment, divergence

FINAL_KNN_KS = (20, 200)
FINAL_KNN_T = 0.07
TSNE_SAMPLES = 2000
TSNE_PERPLEXITY = 30.0
IMAGE_TEXT_TEST_SPLITS = ("test", "test_compositional")

if TYPE_CHECKING:  # ray is imported after pretrainlab, whose import keeps a local Ray on 127.0.0.1
    from ray.train import Checkpoint, Result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML experiment config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--run-name", help="Ray Train / MLflow run name; an existing name resumes that run")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="an MLflow tag of the run")
    return parser.parse_args(argv)


def parse_tags(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; a string without ``=`` or with an empty key is a ConfigError."""
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--tag {item!r}: expected KEY=VALUE")
        tags[key.strip()] = value
    return tags


def git_commit() -> str:
    """The commit of the project folder, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_home(), capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def best_good_checkpoint(result: Result, score: str, mode: str) -> Iterator[tuple[Checkpoint, dict, str]]:
    """The best kept checkpoint by ``score`` that passes verification, its metrics, and a local folder holding it
    while the context lasts (a checkpoint on S3 is downloaded once); a corrupted one is named and passed over.

    Raises:
        CheckpointError: None of the kept checkpoints can be loaded.
    """
    ranked = sorted(result.best_checkpoints, key=lambda pair: pair[1][score], reverse=mode == "max")
    for checkpoint, metrics in ranked:
        with checkpoint.as_directory() as folder:
            try:
                verify_checkpoint(folder)
            except CheckpointError as err:
                print(f"warning: passing over a damaged checkpoint: {err}", flush=True)
                continue
            yield checkpoint, metrics, folder
            return
    raise CheckpointError(f"none of the {len(ranked)} kept checkpoints of the run can be loaded")


def evaluate_embedding(
    client: MlflowClient, run_id: str, folder: str, data_folder: str, cfg: ExperimentConfig, step: int
) -> dict[str, float]:
    """kNN top-1 of the checkpoint's backbone features (train split as bank, test split as queries) logged as
    ``test/knn_top1_k<k>``, and a t-SNE picture of a class-stratified sample of test features under ``tsne/``.

    Returns:
        ``{"knn_top1_k<k>": top-1 in percent}``.
    """
    found = checkpoint_features(folder, ["train", "test"], data_folder, cfg.train.eval_batch_size)
    (bank, bank_labels), (queries, labels) = found.splits["train"], found.splits["test"]
    accuracies = knn_accuracies(bank, bank_labels, queries, labels, found.num_classes, FINAL_KNN_KS, FINAL_KNN_T)
    metrics = {f"knn_top1_k{k}": top1 for k, top1 in accuracies.items()}
    MetricLogger(client, run_id).log({f"test/{key}": value for key, value in metrics.items()}, step)
    rows = stratified_indices(labels.numpy(), TSNE_SAMPLES, cfg.runtime.seed)
    perplexity = min(TSNE_PERPLEXITY, (len(rows) - 1) / 3)
    points = tsne.embed(queries[rows].numpy(), perplexity, cfg.runtime.seed)
    title = f"t-SNE of {cfg.model.backbone} features ({cfg.strategy}), {cfg.data.dataset} test ({len(rows)} images)"
    fig = tsne.plot(points, labels[rows].numpy(), found.loaded.class_names, title)
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / "tsne_test.png", dpi=100, bbox_inches="tight")
        client.log_artifacts(run_id, tmp, "tsne")
    plt.close(fig)
    return metrics


def evaluate_test_splits(
    client: MlflowClient, run_id: str, folder: str, data_folder: str, cfg: ExperimentConfig, step: int
) -> dict[str, float]:
    """An image-text checkpoint on the test split and, when the dataset has one, the compositional test split,
    logged as ``<split>/<metric>``: retrieval Recall@K (baseline ``<split>/shuffled/*``) for image-text
    strategies; for generation strategies the task's metrics and baseline (captioning BLEU / CIDEr, VQA or
    grounding accuracy) and a picture of test predictions and references, ``evaluation/test/samples.png``.

    Returns:
        The test split's metrics.
    """
    loaded = load_model(folder)
    generation = get_strategy(cfg.strategy).TASK == "generation"
    evaluate_split = evaluate_generation_split if generation else evaluate_retrieval_split
    splits = [split for split in IMAGE_TEXT_TEST_SPLITS if split in load_manifest(data_folder)["splits"]]
    logger = MetricLogger(client, run_id)
    results = {}
    for split in splits:
        results[split] = evaluate_split(loaded, split, data_folder, cfg.train.eval_batch_size)
        logger.log({f"{split}/{key}": value for key, value in results[split].items()}, step)
    if generation:
        figure = generation_samples_figure(loaded, "test", data_folder)
        client.log_figure(run_id, figure, "evaluation/test/samples.png")
        plt.close(figure)
    return results["test"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        extra_tags = parse_tags(args.tag)
        tracking_uri = resolve_tracking_uri(cfg.runtime.tracking_uri)
        check_tracking(tracking_uri)
        data_folder = check_experiment(cfg)  # fail here, not inside a Ray worker
    except (ConfigError, TrackingError, *EXPERIMENT_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_name = args.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    init_ray()
    client = client_for(tracking_uri)
    tags = {
        "git.commit": git_commit(),
        "config.hash": cfg.digest(),
        "strategy": cfg.strategy,
        **ray_job_tags(),
        **extra_tags,
    }
    run_id, resumed = start_or_resume_run(client, cfg.runtime.experiment, run_name, tags)
    print(f"{'resuming' if resumed else 'starting'} run {run_name!r} (MLflow run {run_id} at {tracking_uri})")
    changed = log_params(client, run_id, cfg.flat())
    for key, (old, new) in changed.items():
        print(f"  config changed since the last attempt: {key}: {old} -> {new}")
    client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")

    trainer = build_trainer(cfg, run_name, data_folder, {"uri": tracking_uri, "run_id": run_id})
    try:
        result = trainer.fit()
    except BaseException as err:
        client.set_terminated(run_id, "FAILED")
        if (diverged := divergence(err)) is None:
            raise
        print(f"error: {diverged}", file=sys.stderr)
        return 1
    score = cfg.train.checkpoint.score_metric
    step = int(result.metrics["step"])
    with best_good_checkpoint(result, score, cfg.train.checkpoint.score_mode) as (best, best_metrics, folder):
        # the best epoch's value, so that jobs/promote.py --metric best/val/top1 ranks runs by their checkpoints
        client.log_metric(run_id, f"best/{score}", best_metrics[score])
        task = get_strategy(cfg.strategy).TASK
        if task == "embedding":
            knn = evaluate_embedding(client, run_id, folder, data_folder, cfg, step)
            summary = "  ".join(f"{key} {value:.2f}%" for key, value in knn.items())
        elif task == "image_text":
            recall = evaluate_test_splits(client, run_id, folder, data_folder, cfg, step)
            summary = "  ".join(f"{key} {recall[key]:.2f}%" for key in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5"))
        elif task == "generation":
            scores = evaluate_test_splits(client, run_id, folder, data_folder, cfg, step)
            summary = "  ".join(f"{key} {value:.2f}" for key, value in scores.items() if "/" not in key)
        else:
            evaluation = evaluate_checkpoint(folder, "test", data_folder, cfg.train.eval_batch_size)
            log_evaluation(client, run_id, evaluation, step=step)
            summary = f"top-1 {evaluation.metrics['top1']:.2f}%  top-5 {evaluation.metrics['top5']:.2f}%"
        client.log_artifacts(run_id, folder, CHECKPOINT_ARTIFACT)
    version = None
    if cfg.runtime.registered_model:
        version = register_checkpoint(client, run_id, cfg.runtime.registered_model)
    client.set_terminated(run_id, "FINISHED")

    print(f"\nrun {run_name!r} finished: test {summary}")
    print(f"  MLflow run: {run_id} (experiment {cfg.runtime.experiment!r}, store {tracking_uri})")
    print(
        f"  checkpoint: runs:/{run_id}/{CHECKPOINT_ARTIFACT}  (Ray Train copy: {location(best.filesystem, best.path)})"
    )
    if version is not None:
        print(f"  registered: models:/{version.name}/{version.version}")
    if not tracking_uri.startswith("http"):
        print(f"  browse it:  mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import yaml

from pretrainlab.cluster import init_ray, ray_job_tags
from pretrainlab.config import ConfigError, load_config
from pretrainlab.paths import project_home
from pretrainlab.tracking.mlflow import (
    CHECKPOINT_ARTIFACT,
    TrackingError,
    check_tracking,
    client_for,
    log_evaluation,
    log_params,
    register_checkpoint,
    resolve_tracking_uri,
    start_or_resume_run,
)
from pretrainlab.train.evaluate import evaluate_checkpoint
from pretrainlab.train.trainer import EXPERIMENT_ERRORS, build_trainer, check_experiment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML experiment config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--run-name", help="Ray Train / MLflow run name; an existing name resumes that run")
    return parser.parse_args(argv)


def git_commit() -> str:
    """The commit of the project folder, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_home(), capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        tracking_uri = resolve_tracking_uri(cfg.runtime.tracking_uri)
        check_tracking(tracking_uri)
        data_folder = check_experiment(cfg)  # fail here, not inside a Ray worker
    except (ConfigError, TrackingError, *EXPERIMENT_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_name = args.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    init_ray()
    client = client_for(tracking_uri)
    tags = {"git.commit": git_commit(), "config.hash": cfg.digest(), "strategy": cfg.strategy, **ray_job_tags()}
    run_id, resumed = start_or_resume_run(client, cfg.runtime.experiment, run_name, tags)
    print(f"{'resuming' if resumed else 'starting'} run {run_name!r} (MLflow run {run_id} at {tracking_uri})")
    changed = log_params(client, run_id, cfg.flat())
    for key, (old, new) in changed.items():
        print(f"  config changed since the last attempt: {key}: {old} -> {new}")
    client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")

    trainer = build_trainer(cfg, run_name, data_folder, {"uri": tracking_uri, "run_id": run_id})
    try:
        result = trainer.fit()
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    score = cfg.train.checkpoint.score_metric
    best = result.get_best_checkpoint(score, cfg.train.checkpoint.score_mode)
    best_metrics = next(metrics for checkpoint, metrics in result.best_checkpoints if checkpoint.path == best.path)
    # the best epoch's value, so that jobs/promote.py --metric best/val/top1 ranks runs by their checkpoints
    client.log_metric(run_id, f"best/{score}", best_metrics[score])
    with best.as_directory() as folder:
        evaluation = evaluate_checkpoint(folder, "test", data_folder, cfg.train.eval_batch_size)
        log_evaluation(client, run_id, evaluation, step=int(result.metrics["step"]))
        client.log_artifacts(run_id, folder, CHECKPOINT_ARTIFACT)
    version = None
    if cfg.runtime.registered_model:
        version = register_checkpoint(client, run_id, cfg.runtime.registered_model)
    client.set_terminated(run_id, "FINISHED")

    test = evaluation.metrics
    print(f"\nrun {run_name!r} finished: test top-1 {test['top1']:.2f}%  top-5 {test['top5']:.2f}%")
    print(f"  MLflow run: {run_id} (experiment {cfg.runtime.experiment!r}, store {tracking_uri})")
    print(f"  checkpoint: runs:/{run_id}/{CHECKPOINT_ARTIFACT}  (Ray Train copy: {best.path})")
    if version is not None:
        print(f"  registered: models:/{version.name}/{version.version}")
    if not tracking_uri.startswith("http"):
        print(f"  browse it:  mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())

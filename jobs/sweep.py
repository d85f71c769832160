"""Sweep an experiment's hyperparameters with Ray Tune; one MLflow parent run, a child run per trial.

    python jobs/sweep.py configs/sweeps/test-resnet_digits_asha.yaml [--set sweep.num_samples=8]

On a running cluster:

    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"PRETRAINLAB_HOME": "'"$PWD"'"}}' \
        -- python jobs/sweep.py configs/sweeps/resnet10t_fmnist_asha.yaml

The config's ``sweep`` section says what to search (see README, "Sweeps"). Every trial
trains like ``jobs/pretrain.py``; promote the winner with ``jobs/promote.py``.
"""

from __future__ import annotations

import argparse
import sys
import time

import yaml

from pretrainlab.cluster import init_ray, ray_job_tags
from pretrainlab.config import ConfigError, load_config
from pretrainlab.paths import resolve_tracking_uri
from pretrainlab.sweep.report import best_outcome, log_summary, results_table
from pretrainlab.sweep.space import check_space
from pretrainlab.sweep.tune import SweepContext, SweepTracker, build_tuner
from pretrainlab.tracking.mlflow import TrackingError, check_tracking, client_for, log_params, start_or_resume_run
from pretrainlab.train.trainer import EXPERIMENT_ERRORS, check_experiment


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="YAML experiment config with a sweep section")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--name", help="sweep name (MLflow parent run, Tune experiment); default: config name + time")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        sweep_config = check_space(cfg)
        tracking_uri = resolve_tracking_uri(cfg.runtime.tracking_uri)
        check_tracking(tracking_uri)
        data_folder = check_experiment(cfg)
    except (ConfigError, TrackingError, *EXPERIMENT_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sweep_name = args.name or f"{cfg.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"

    init_ray()
    client = client_for(tracking_uri)
    tags = {"pretrainlab.kind": "sweep", "config.hash": cfg.digest(), "strategy": cfg.strategy, **ray_job_tags()}
    parent_id, _ = start_or_resume_run(client, cfg.runtime.experiment, sweep_name, tags)
    log_params(client, parent_id, cfg.flat())
    client.log_text(parent_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
    print(f"sweep {sweep_name!r}: MLflow parent run {parent_id} (experiment {cfg.runtime.experiment!r})")

    sweep = SweepContext.create(cfg, data_folder, tracking_uri, parent_id, sweep_name)
    tracker = SweepTracker(sweep, sweep_config, cfg.runtime.experiment, cfg.train.epochs)
    try:
        tuner = build_tuner(cfg, sweep, tracker)
        tuner.fit()
    except ConfigError as err:
        client.set_terminated(parent_id, "FAILED")
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    outcomes = list(tracker.outcomes.values())
    log_summary(client, parent_id, outcomes, sweep_config)
    best = best_outcome(outcomes, sweep_config)
    client.set_terminated(parent_id, "FINISHED" if best is not None else "FAILED")

    print(results_table(outcomes, sweep_config).drop(columns=["run_id"]).to_string(index=False))
    if best is None:
        print(f"\nno trial reported {sweep_config.metric}", file=sys.stderr)
        return 1
    print(f"\nbest trial {best.trial_id}: {sweep_config.metric} {best.best_metric:.4g} (MLflow run {best.run_id})")
    print(f"  promote it: python jobs/promote.py --experiment {cfg.runtime.experiment} --metric {sweep_config.metric}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

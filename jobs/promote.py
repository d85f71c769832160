"""Promote the best run of an experiment: register its checkpoint and point an alias at it.

    python jobs/promote.py --experiment pretrainlab --metric val/top1 --mode max
    python jobs/promote.py --experiment pretrainlab --metric val/loss --mode min --alias staging \
        --filter "tags.strategy = 'supervised'" --dry-run

On a cluster: ``ray job submit --working-dir . -- python jobs/promote.py --experiment fmnist --metric best/val/top1``.

The best FINISHED run by the metric must have a ``checkpoint`` artifact. Its checkpoint is
registered as a version of ``--model`` (default: the run's ``runtime.registered_model``),
or the version already registered from that run is reused, and the alias (default
``champion``) moves to it; the former holder gets the alias ``previous``. Running it again
with no better run changes nothing.
"""

from __future__ import annotations

import argparse
import sys

from mlflow.exceptions import MlflowException

from pretrainlab.paths import resolve_tracking_uri
from pretrainlab.tracking.mlflow import TrackingError
from pretrainlab.tracking.registry import DEFAULT_ALIAS, PromotionError, open_store, promote


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--metric", required=True, help="metric that ranks the runs, e.g. val/top1")
    parser.add_argument("--mode", choices=["max", "min"], default="max", help="max: highest wins (default)")
    parser.add_argument("--alias", default=DEFAULT_ALIAS, help=f"alias to move (default: {DEFAULT_ALIAS})")
    parser.add_argument("--model", help="registered model name (default: the run's runtime.registered_model)")
    parser.add_argument("--filter", default="", help="MLflow search filter on the candidates, e.g. \"tags.x = 'y'\"")
    parser.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    parser.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else the project's mlflow.db")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    try:
        client = open_store(tracking_uri)
        promotion = promote(
            client, args.experiment, args.metric, args.mode, args.alias, args.model, args.filter, args.dry_run
        )
    except (PromotionError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:
        print(f"error: MLflow at {tracking_uri}: {err.message}", file=sys.stderr)
        return 2
    for line in promotion.lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
